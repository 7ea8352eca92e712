"""The model directory as its own checkpoint: open (lock, recover), sync, rollback,
verify, status — each job in its own module, composed here.

See `generations` for the files under ``DIR/.livetrain/checkpoint/``, `sync_writer` for
how a sync is written, `rollback` and `verify`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from livetrain.checkpoint import fileio
from livetrain.checkpoint.block_diff import NameMap
from livetrain.checkpoint.errors import CheckpointError, MissingFileError, NotWritableError
from livetrain.checkpoint.generations import DEFAULT_KEEP_GENERATIONS, Generation, GenerationFiles
from livetrain.checkpoint.lock import DirectoryLock
from livetrain.checkpoint.rollback import roll_back
from livetrain.checkpoint.sync_writer import SyncResult, SyncWriter
from livetrain.checkpoint.verify import VerifyReport, verify


class ModelDirectory:
    """A Hugging Face model directory whose safetensors files follow the live weights.

    Open with `ModelDirectory.open`; one process at a time may open a directory for
    writing. `sync` and `rollback` are serialised within the process too.
    """

    def __init__(self, path: Path, keep_generations: int, read_only: bool, lock: DirectoryLock | None):
        self.path = path
        self.keep_generations = keep_generations
        self.read_only = read_only
        self._lock = lock
        self._mutex = threading.Lock()
        self._files = GenerationFiles(path, keep_generations)
        self._writer = SyncWriter(self._files)

    @classmethod
    def open(cls, model_dir: str | os.PathLike, keep_generations: int = DEFAULT_KEEP_GENERATIONS,
             *, read_only: bool = False, holder: str = "livetrain checkpoint") -> ModelDirectory:
        """Open `model_dir`; for writing (the default) it takes the directory's lock (in
        the name of `holder`, which a refused opener is shown) and undoes any interrupted
        sync or finishes an interrupted rollback.

        `read_only` takes no lock and changes nothing (status, log, verify beside a
        running server). Raises `MissingFileError`, `DirectoryInUse`,
        `NotWritableError`, `RecoveryError`.
        """
        path = Path(model_dir).resolve()
        if not path.is_dir():
            raise MissingFileError(f"model directory {path} does not exist")
        if not isinstance(keep_generations, int) or keep_generations < 0:
            raise ValueError(f"keep_generations must be an int >= 0, got {keep_generations!r}")
        if read_only:
            return cls(path, keep_generations, True, None)
        folder = GenerationFiles(path, keep_generations).folder
        with fileio.translated(folder, "creating"):
            folder.mkdir(parents=True, exist_ok=True)
        directory = cls(path, keep_generations, False, DirectoryLock(path, holder))
        try:
            directory._files.recover()
        except BaseException:
            directory.close()
            raise
        return directory

    def close(self) -> None:
        """Release the directory's lock and its file maps."""
        self._writer.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ModelDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def checkpoint_dir(self) -> Path:
        return self._files.folder

    @property
    def latest(self) -> int:
        """The newest committed generation (0 before the first sync)."""
        return self._files.latest

    def pending(self) -> list[int]:
        """Generations with an undo record but no commit: interrupted syncs or rollbacks."""
        return self._files.pending()

    def generations(self) -> list[Generation]:
        """The committed generations whose records are kept, oldest first."""
        return self._files.generations()

    def reachable(self) -> list[int]:
        """Generations `rollback` can restore."""
        return self._files.reachable()

    def prune(self) -> None:
        """Drop undo and commit records beyond ``keep_generations`` (see `GenerationFiles.prune`)."""
        self._files.prune()

    def sync(self, live: Mapping[str, torch.Tensor], name_map: NameMap | None = None) -> SyncResult:
        """Write the blocks of the files that differ from `live` as a new generation.

        `live`: Hugging Face name -> tensor (any dtype/device; cast to the file's dtype
        piece by piece), or engine names with `name_map` saying where each goes. Only the
        changed 4 KiB blocks are written, in place, or a file is rewritten whole when
        that writes fewer bytes. Crash-consistent; on an error the files are unchanged.
        """
        with self._mutex:
            self._require_writable()
            return self._writer.sync(live, name_map)

    def rollback(self, to: int) -> dict[str, torch.Tensor]:
        """Restore the files to generation `to`, bit for bit, and drop the later generations;
        returns the restored tensors the dropped generations had touched (`rollback.roll_back`)."""
        with self._mutex:
            self._require_writable()
            return roll_back(self._files, to)

    def verify(self) -> VerifyReport:
        """Re-read every tensor of every file and check it (`verify.verify`)."""
        return verify(self._files)

    def status(self) -> dict:
        """Plain data: latest generation, what rollback can reach, disk used by undo data."""
        gens = self.generations()
        latest = gens[-1] if gens and gens[-1].generation == self.latest else None
        return {
            "directory": str(self.path),
            "generation": self.latest,
            "time": latest.time if latest else None,
            "reachable": self.reachable(),
            "undo_bytes_kept": self._files.undo_bytes(),
            "keep_generations": self.keep_generations,
            "interrupted": self.pending(),
        }

    def _require_writable(self) -> None:
        if self.read_only:
            raise NotWritableError(f"{self.path} was opened read-only")
        if self._lock is None:
            raise CheckpointError(f"{self.path} is closed")
