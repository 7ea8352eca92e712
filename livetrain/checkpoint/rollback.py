"""Rollback: the files back to an earlier generation, bit for bit.

Rollback uncommits the newest generation (removes its commit record) and undoes it as
an interrupted sync, one generation at a time, so a crash in the middle of a rollback
is finished by the next open.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from livetrain.checkpoint import fileio, journal
from livetrain.checkpoint.errors import GenerationNotFoundError
from livetrain.checkpoint.generations import GenerationFiles
from livetrain.formats.safetensors_layout import ModelLayout


def roll_back(files: GenerationFiles, to: int) -> dict[str, torch.Tensor]:
    """Restore the model directory's files to generation ``to`` and drop the later ones.

    Returns the restored tensors (Hugging Face name -> CPU tensor in the file's dtype)
    that the dropped generations had touched. Raises `GenerationNotFoundError` (nothing
    changed) when ``to`` is unknown or its undo records were pruned.
    """
    if to == files.latest:
        return {}
    reachable = files.reachable()
    if to not in reachable:
        raise GenerationNotFoundError(
            f"{files.path}: cannot roll back to generation {to}; reachable: "
            f"{reachable[0]}..{reachable[-1]} (older undo records are pruned after "
            f"{files.keep_generations} generations)")
    later = [g for g in files.generations() if g.generation > to]
    for g in later:  # the old versions of replaced files must be there before anything moves
        record = journal.UndoRecord.read(files.file(g.generation, ".undo"))
        for entry in record.files:
            if entry.mode == "whole" and not (record.old_dir / entry.file).exists():
                raise GenerationNotFoundError(
                    f"{record.old_dir / entry.file} is missing: generation {g.generation} cannot be undone")
    stats = fileio.WriteStats()
    for g in reversed(later):
        fileio.unlink(files.file(g.generation, ".json"))  # uncommit...
        fileio.fsync_dir(files.folder)
        files.undo_uncommitted(g.generation, stats)  # ...then undo, as an interrupted sync
    return read_tensors(files.path, sorted({name for g in later for name in g.tensors}))


def read_tensors(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Named tensors as the files hold them (CPU copies, file dtype)."""
    from safetensors import safe_open

    layout = ModelLayout.read(model_dir)
    out = {}
    by_file = defaultdict(list)
    for name in names:
        if name in layout.tensors:
            by_file[layout.tensors[name].file].append(name)
    for file, file_names in by_file.items():
        with safe_open(str(model_dir / file), framework="pt") as f:
            for name in file_names:
                out[name] = f.get_tensor(name)
    return out
