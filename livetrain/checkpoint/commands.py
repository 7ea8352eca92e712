"""One function per `livetrain checkpoint` subcommand, each returning plain printable data.

With no live process the files are the truth: `status`, `log`, `verify` read them (read-
only, beside a running server too), `rollback` restores a generation, and `sync` writes
the tensors of another safetensors file (e.g. weights trained elsewhere) as a new
generation, or, with no file, only recovers an interrupted sync.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from livetrain.checkpoint.directory import ModelDirectory
from livetrain.checkpoint.generations import DEFAULT_KEEP_GENERATIONS


def checkpoint_status(model_dir: str | os.PathLike) -> dict:
    """Latest generation, reachable generations, undo bytes kept, interrupted syncs."""
    with ModelDirectory.open(model_dir, read_only=True) as directory:
        return directory.status()


def checkpoint_log(model_dir: str | os.PathLike) -> list[dict]:
    """Every kept generation, oldest first (time, bytes written, tensors and checksums)."""
    with ModelDirectory.open(model_dir, read_only=True) as directory:
        return [asdict(g) for g in directory.generations()]


def checkpoint_verify(model_dir: str | os.PathLike) -> dict:
    """Re-read every tensor; `ok` is False and `problems` name file and tensor on damage."""
    with ModelDirectory.open(model_dir, read_only=True) as directory:
        report = directory.verify()
    return {"ok": report.ok, **asdict(report)}


def checkpoint_rollback(model_dir: str | os.PathLike, to: int,
                        keep_generations: int = DEFAULT_KEEP_GENERATIONS) -> dict:
    """Restore generation `to`; returns it and the names of the tensors restored."""
    with ModelDirectory.open(model_dir, keep_generations) as directory:
        restored = directory.rollback(to)
        return {"generation": directory.latest, "tensors_restored": sorted(restored)}


def checkpoint_sync(model_dir: str | os.PathLike, source: str | os.PathLike | None = None,
                    keep_generations: int = DEFAULT_KEEP_GENERATIONS) -> dict:
    """Write the tensors of safetensors file `source` into the model directory as a new
    generation (only blocks that differ); with no `source`, just open (recovering an
    interrupted sync) and report the current generation."""
    from safetensors.torch import load_file

    with ModelDirectory.open(model_dir, keep_generations) as directory:
        if source is None:
            return {"generation": directory.latest, "bytes_written": 0, "tensors_touched": []}
        result = directory.sync(load_file(Path(source)))
        return asdict(result)
