"""The generations of a model directory, as files under ``DIR/.livetrain/checkpoint/``:

    <g>.undo             undo record of generation g (see `journal`)
    <g>.old/<file>       previous version of a file that generation g replaced whole
    <g>.json             commit record: its presence is what makes generation g committed
    <g>.new/<file>       staging of a whole-file rewrite (never committed state)

An undo record without a commit record is an interrupted sync (or rollback): opening
the directory for writing undoes it. Generation 0 is the directory as it was before the
first sync. `GenerationFiles` reads and removes these files; writing a generation is
`sync_writer`'s, undoing them `rollback`'s.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from livetrain.checkpoint import fileio, journal

CHECKPOINT_DIR = Path(".livetrain") / "checkpoint"
DEFAULT_KEEP_GENERATIONS = 20


@dataclass(frozen=True)
class Generation:
    """A committed sync, as its commit record tells it."""

    generation: int
    time: float  # Unix time of the commit
    seconds: float  # how long the sync took
    bytes_written: int  # model files + journal + metadata
    blocks_changed: int
    files: dict[str, dict]  # file -> {"mode": "blocks"|"whole", "blocks_changed", "bytes_written"}
    tensors: dict[str, str]  # touched tensor -> SHA-256 of its bytes in the file after the sync
    undo_bytes: int  # size of the undo record (plus kept old files for "whole" files)
    rollback_available: bool = False  # its undo records are still kept


class GenerationFiles:
    """The checkpoint folder of the model directory ``path``."""

    def __init__(self, path: Path, keep_generations: int) -> None:
        self.path = path  # the model directory
        self.folder = path / CHECKPOINT_DIR
        self.keep_generations = keep_generations

    def file(self, generation: int, suffix: str) -> Path:
        """``<generation><suffix>`` in the checkpoint folder, e.g. ``00000003.undo``."""
        return self.folder / f"{generation:08d}{suffix}"

    def numbers(self, suffix: str) -> list[int]:
        """The generations that have a ``<g><suffix>`` file, in order."""
        if not self.folder.is_dir():
            return []
        return sorted(int(p.name[:-len(suffix)]) for p in self.folder.iterdir()
                      if p.name.endswith(suffix) and p.name[:-len(suffix)].isdigit())

    @property
    def latest(self) -> int:
        """The newest committed generation (0 before the first sync)."""
        committed = self.numbers(".json")
        return committed[-1] if committed else 0

    def pending(self) -> list[int]:
        """Generations with an undo record but no commit: interrupted syncs or rollbacks."""
        committed = set(self.numbers(".json"))
        return [g for g in self.numbers(".undo") if g not in committed]

    def generations(self) -> list[Generation]:
        """The committed generations whose records are kept, oldest first."""
        undo = set(self.numbers(".undo"))
        out = []
        for g in self.numbers(".json"):
            record = json.loads(self.file(g, ".json").read_text())
            out.append(Generation(**record, rollback_available=g in undo))
        return out

    def reachable(self) -> list[int]:
        """Generations a rollback can restore: the latest, and each one whose every later
        generation still has its undo record."""
        latest = self.latest
        undo = set(self.numbers(".undo"))
        out = [latest]
        g = latest
        while g > 0 and g in undo:
            g -= 1
            out.append(g)
        return sorted(out)

    def recover(self) -> None:
        """Undo every interrupted sync or rollback, newest first, and drop staging leftovers."""
        stats = fileio.WriteStats()
        for g in sorted(self.pending(), reverse=True):
            self.undo_uncommitted(g, stats)
        for p in self.folder.iterdir():
            stale = p.name.endswith(".tmp") or p.name.endswith(".new") or (
                p.name.endswith(".old") and not p.with_suffix(".undo").exists())
            if stale:
                self.remove(p)

    def undo_uncommitted(self, g: int, stats: fileio.WriteStats) -> None:
        """Undo generation g, whose commit record is gone or never written, then drop its
        undo record."""
        record = journal.UndoRecord.read(self.file(g, ".undo"))
        journal.undo(record, self.path, stats)
        self.remove(record.path)
        self.remove(record.old_dir)
        self.remove(self.file(g, ".new"))
        fileio.fsync_dir(self.folder)

    def prune(self) -> None:
        """Keep undo records of the newest ``keep_generations`` generations and commit
        records of one more (the oldest generation a rollback can reach); drop the rest.

        An undo record goes before its commit record: a crash in between must never leave
        an undo record without a commit (that would read as an interrupted sync)."""
        latest = self.latest
        removed = False
        for g in self.numbers(".undo"):
            if g <= latest - self.keep_generations:
                self.remove(self.file(g, ".undo"))
                self.remove(self.file(g, ".old"))
                removed = True
        for g in self.numbers(".json"):
            if g < latest - self.keep_generations:
                self.remove(self.file(g, ".json"))
                removed = True
        if removed:
            fileio.fsync_dir(self.folder)

    def undo_bytes(self) -> int:
        """Disk used by the kept undo records."""
        return sum(journal.UndoRecord.read(self.file(g, ".undo")).nbytes for g in self.numbers(".undo"))

    @staticmethod
    def remove(path: Path) -> None:
        if path.is_dir():
            with fileio.translated(path, "removing"):
                shutil.rmtree(path)
        else:
            fileio.unlink(path)
