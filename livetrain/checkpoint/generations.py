"""The model directory as its own checkpoint: sync, generations, rollback, verify.

A sync compares the live tensors with the files (`block_diff`), writes an undo record
(`journal`), then changes the files, then commits a generation. Files under
``DIR/.livetrain/checkpoint/`` (the writer holds ``DIR/.livetrain/lock``, see `lock`):

    <g>.undo             undo record of generation g (see `journal`)
    <g>.old/<file>       previous version of a file that generation g replaced whole
    <g>.json             commit record: its presence is what makes generation g committed
    <g>.new/<file>       staging of a whole-file rewrite (never committed state)

An undo record without a commit record is an interrupted sync (or rollback): opening
the directory for writing undoes it. Rollback uncommits the newest generation (removes
its commit record) and undoes it, one generation at a time, so a crash in the middle
of a rollback is finished by the next open. Generation 0 is the directory as it was
before the first sync.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from livetrain.checkpoint import fileio, journal
from livetrain.checkpoint.block_diff import CHUNK_BYTES, ChangedBlocks, NameMap, diff_placements, place_tensors
from livetrain.checkpoint.errors import (CheckpointError, GenerationNotFoundError,
                                         MissingFileError, NotWritableError)
from livetrain.checkpoint.lock import DirectoryLock
from livetrain.checkpoint.safetensors_layout import ModelLayout

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


@dataclass(frozen=True)
class SyncResult:
    """What one sync did. When nothing changed, `generation` is the current one and no
    byte was written."""

    generation: int
    bytes_written: int  # model_bytes + journal_bytes + metadata_bytes
    blocks_changed: int
    tensors_touched: list[str]
    seconds: float
    model_bytes: int = 0
    journal_bytes: int = 0
    metadata_bytes: int = 0
    changed_block_bytes: int = 0  # bytes of the 4 KiB blocks that differ
    modes: dict[str, str] = field(default_factory=dict)  # file -> "blocks" | "whole"


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of `ModelDirectory.verify`: `ok` when `problems` is empty."""

    generation: int
    files: int
    tensors: int
    checksums_checked: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _name(generation: int, suffix: str) -> str:
    return f"{generation:08d}{suffix}"


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
        # file -> ((st_dev, st_ino, size), uint8 [size] read-only shared map), kept between syncs
        self._maps: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}

    # ------------------------------------------------------------------ opening

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
        ckdir = path / CHECKPOINT_DIR
        with fileio.translated(ckdir, "creating"):
            ckdir.mkdir(parents=True, exist_ok=True)
        directory = cls(path, keep_generations, False, DirectoryLock(path, holder))
        try:
            directory._recover()
        except BaseException:
            directory.close()
            raise
        return directory

    def close(self) -> None:
        """Release the directory's lock and its file maps."""
        self._maps.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ModelDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def _numbers(self, suffix: str) -> list[int]:
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(int(p.name[:-len(suffix)]) for p in self.checkpoint_dir.iterdir()
                      if p.name.endswith(suffix) and p.name[:-len(suffix)].isdigit())

    @property
    def latest(self) -> int:
        """The newest committed generation (0 before the first sync)."""
        committed = self._numbers(".json")
        return committed[-1] if committed else 0

    def pending(self) -> list[int]:
        """Generations with an undo record but no commit: interrupted syncs or rollbacks."""
        committed = set(self._numbers(".json"))
        return [g for g in self._numbers(".undo") if g not in committed]

    def _recover(self) -> None:
        stats = fileio.WriteStats()
        for g in sorted(self.pending(), reverse=True):
            self._undo_generation(g, stats)
        for p in self.checkpoint_dir.iterdir():
            stale = p.name.endswith(".tmp") or p.name.endswith(".new") or (
                p.name.endswith(".old") and not p.with_suffix(".undo").exists())
            if stale:
                self._remove(p)

    def _undo_generation(self, g: int, stats: fileio.WriteStats) -> None:
        """Undo uncommitted generation g, then drop its undo record."""
        record = journal.UndoRecord.read(self.checkpoint_dir / _name(g, ".undo"))
        journal.undo(record, self.path, stats)
        self._remove(record.path)
        self._remove(record.old_dir)
        self._remove(self.checkpoint_dir / _name(g, ".new"))
        fileio.fsync_dir(self.checkpoint_dir)

    def _remove(self, path: Path) -> None:
        if path.is_dir():
            with fileio.translated(path, "removing"):
                shutil.rmtree(path)
        else:
            fileio.unlink(path)

    def _require_writable(self) -> None:
        if self.read_only:
            raise NotWritableError(f"{self.path} was opened read-only")
        if self._lock is None:
            raise CheckpointError(f"{self.path} is closed")

    # --------------------------------------------------------------------- sync

    def sync(self, live: Mapping[str, torch.Tensor], name_map: NameMap | None = None) -> SyncResult:
        """Write the blocks of the files that differ from `live` as a new generation.

        `live`: Hugging Face name -> tensor (any dtype/device; cast to the file's dtype
        piece by piece), or engine names with `name_map` saying where each goes. Only the
        changed 4 KiB blocks are written, in place, or a file is rewritten whole when
        that writes fewer bytes. Crash-consistent; on an error the files are unchanged.
        """
        with self._mutex:
            self._require_writable()
            return self._sync(live, name_map)

    def _sync(self, live: Mapping[str, torch.Tensor], name_map: NameMap | None) -> SyncResult:
        t0 = time.perf_counter()
        layout = ModelLayout.read(self.path)
        placements = place_tensors(layout, live, name_map)
        by_file = defaultdict(list)
        for p in placements:
            by_file[p.location.file].append(p)
        stats = fileio.WriteStats()
        fds: dict[str, int] = {}
        try:
            changes: dict[str, ChangedBlocks] = {}
            touched: set[str] = set()
            for file, file_placements in by_file.items():
                fds[file] = fd = fileio.open_fd(self.path / file, os.O_RDWR)  # fails early if not writable
                change = ChangedBlocks(file, self._mapped(file, fd))
                touched |= diff_placements(change, file_placements)
                if change.blocks:
                    changes[file] = change
            if not changes:
                return SyncResult(self.latest, 0, 0, [], time.perf_counter() - t0)
            g = self.latest + 1
            modes = {file: self._choose_mode(change) for file, change in changes.items()}
            tensors = self._write_generation(g, changes, modes, fds, stats, layout, touched)
            blocks = sum(len(c.blocks) for c in changes.values())
            try:
                files = {f: {"mode": modes[f], "blocks_changed": len(c.blocks),
                             "bytes_written": stats.by_file.get(f, 0)} for f, c in changes.items()}
                undo_bytes = journal.UndoRecord.read(self.checkpoint_dir / _name(g, ".undo")).nbytes
                self._commit(g, stats, blocks, files, tensors, undo_bytes, t0)
            except BaseException:
                self._abort(g)
                raise
            self.prune()
            return SyncResult(g, stats.total, blocks, sorted(touched), time.perf_counter() - t0,
                              stats.model, stats.journal, stats.metadata,
                              sum(c.nbytes for c in changes.values()), modes)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _mapped(self, file: str, fd: int) -> np.ndarray:
        """The file's bytes, mapped read-only and shared (uint8 [size]). The map is kept
        between syncs while the file is the same inode and size: mapping a file costs
        about as much as comparing it, and a shared map sees every in-place write. A file
        replaced by rename gets a new map."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_size)
        kept = self._maps.get(file)
        if kept is None or kept[0] != key:
            kept = self._maps[file] = (key, fileio.map_readonly(fd, st.st_size))
        return kept[1]

    def _choose_mode(self, change: ChangedBlocks) -> str:
        """"blocks" (write changed blocks in place, undo data in the journal) or "whole"
        (rewrite the file, keep the old one by hard link: no undo bytes written), by which
        writes fewer bytes. The undo data is only compressed to count it when it could
        tip the balance."""
        changed = change.nbytes
        if 2 * changed <= change.size:
            return "blocks"
        return "whole" if change.size < changed + journal.estimate_undo_bytes(change) else "blocks"

    def _write_generation(self, g: int, changes: dict[str, ChangedBlocks], modes: dict[str, str],
                          fds: dict[str, int], stats: fileio.WriteStats, layout: ModelLayout,
                          touched: set[str]) -> dict[str, str]:
        """Undo record first (durable), then the file changes (durable); on a failure the
        changes made so far are undone before the error goes on. Returns the SHA-256 of
        each touched tensor as now in the files: the in-place files' tensors are hashed
        while those files are being flushed to disk."""
        in_place = [c for f, c in changes.items() if modes[f] == "blocks"]
        whole = [c for f, c in changes.items() if modes[f] == "whole"]
        staging = self.checkpoint_dir / _name(g, ".new")
        record_path = self.checkpoint_dir / _name(g, ".undo")
        try:
            for change in whole:
                self._write_whole_file(change, staging / change.file, stats)
            journal.write_undo_record(record_path, g, in_place, [c.file for c in whole], stats)
        except BaseException:
            self._remove(staging)
            raise
        in_place_files = {c.file for c in in_place}
        try:
            for change in in_place:
                self._write_blocks(change, fds[change.file], stats)
            with ThreadPoolExecutor(1) as pool:
                flushed = pool.submit(self._flush, in_place, fds)
                sums = _tensor_checksums(layout, [n for n in touched if layout.tensors[n].file in in_place_files],
                                         {c.file: c.old for c in in_place})
                flushed.result()
            if whole:
                old_dir = record_path.with_suffix(".old")
                with fileio.translated(old_dir, "creating"):
                    old_dir.mkdir()
                fileio.fsync_dir(self.checkpoint_dir)
                for change in whole:
                    fileio.link(self.path / change.file, old_dir / change.file)
                    fileio.replace(staging / change.file, self.path / change.file)
                fileio.fsync_dir(old_dir)
                fileio.fsync_dir(self.path)
                sums.update(_tensor_checksums(
                    layout, [n for n in touched if layout.tensors[n].file not in in_place_files],
                    {c.file: fileio.map_path(self.path / c.file) for c in whole}))
        except BaseException:
            self._abort(g)
            raise
        return sums

    def _abort(self, g: int) -> None:
        """Take back a sync that failed before or while committing (best effort: what is
        left undone, the next open finishes)."""
        try:
            for suffix in (".json.tmp", ".json"):
                fileio.unlink(self.checkpoint_dir / _name(g, suffix))
            self._undo_generation(g, fileio.WriteStats())
        except CheckpointError:
            pass

    def _write_blocks(self, change: ChangedBlocks, fd: int, stats: fileio.WriteStats) -> None:
        """pwrite each run of consecutive changed blocks (not yet durable: see `_flush`)."""
        path = self.path / change.file
        indices = sorted(change.blocks)
        run_start = 0
        for k in range(1, len(indices) + 1):
            if k == len(indices) or indices[k] != indices[k - 1] + 1:
                run = indices[run_start:k]
                fileio.pwritev_all(fd, [change.blocks[i] for i in run], change.block_range(run[0])[0],
                                   path, "model", stats)
                run_start = k

    def _flush(self, in_place: list[ChangedBlocks], fds: dict[str, int]) -> None:
        """Make the block writes durable. In-place writes leave the size unchanged, so
        fdatasync (no metadata) suffices."""
        for change in in_place:
            fileio.fsync(fds[change.file], self.path / change.file, data_only=True)

    def _write_whole_file(self, change: ChangedBlocks, out: Path, stats: fileio.WriteStats) -> None:
        """The new version of a file, in `out`: old bytes with the changed blocks, fsync'd."""
        with fileio.translated(out.parent, "creating"):
            out.parent.mkdir(exist_ok=True)
        fd = fileio.open_fd(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.fchmod(fd, os.stat(self.path / change.file).st_mode & 0o7777)
            indices = sorted(change.blocks)
            k = 0
            for start in range(0, change.size, CHUNK_BYTES):
                stop = min(start + CHUNK_BYTES, change.size)
                buf = change.old[start:stop].copy()
                while k < len(indices) and change.block_range(indices[k])[0] < stop:
                    b0, b1 = change.block_range(indices[k])
                    buf[b0 - start:b1 - start] = np.frombuffer(change.blocks[indices[k]], dtype=np.uint8)
                    k += 1
                fileio.write_all(fd, buf, out, "model", stats)
            fileio.fsync(fd, out)
        finally:
            os.close(fd)

    def _commit(self, g: int, stats: fileio.WriteStats, blocks: int, files: dict, tensors: dict[str, str],
                undo_bytes: int, t0: float) -> None:
        """Write the commit record; the record counts its own bytes in `bytes_written`."""
        record = {"generation": g, "time": time.time(), "seconds": 0.0, "bytes_written": 0,
                  "blocks_changed": blocks, "files": files, "tensors": tensors, "undo_bytes": undo_bytes}
        data = b""
        for _ in range(3):  # the size of the number changes the size of the record, rarely twice
            record["seconds"] = round(time.perf_counter() - t0, 6)
            record["bytes_written"] = stats.total + len(data)
            data = json.dumps(record, indent=1).encode()
        fileio.write_file_durably(self.checkpoint_dir / _name(g, ".json"), data, "metadata", stats)

    # -------------------------------------------------------------- generations

    def generations(self) -> list[Generation]:
        """The committed generations whose records are kept, oldest first."""
        undo = set(self._numbers(".undo"))
        out = []
        for g in self._numbers(".json"):
            record = json.loads((self.checkpoint_dir / _name(g, ".json")).read_text())
            out.append(Generation(**record, rollback_available=g in undo))
        return out

    def reachable(self) -> list[int]:
        """Generations `rollback` can restore: the latest, and each one whose every later
        generation still has its undo record."""
        latest = self.latest
        undo = set(self._numbers(".undo"))
        out = [latest]
        g = latest
        while g > 0 and g in undo:
            g -= 1
            out.append(g)
        return sorted(out)

    def prune(self) -> None:
        """Keep undo records of the newest `keep_generations` generations and commit records
        of one more (the oldest generation a rollback can reach); drop the rest.

        An undo record goes before its commit record: a crash in between must never leave
        an undo record without a commit (that would read as an interrupted sync)."""
        latest = self.latest
        removed = False
        for g in self._numbers(".undo"):
            if g <= latest - self.keep_generations:
                self._remove(self.checkpoint_dir / _name(g, ".undo"))
                self._remove(self.checkpoint_dir / _name(g, ".old"))
                removed = True
        for g in self._numbers(".json"):
            if g < latest - self.keep_generations:
                self._remove(self.checkpoint_dir / _name(g, ".json"))
                removed = True
        if removed:
            fileio.fsync_dir(self.checkpoint_dir)

    def rollback(self, to: int) -> dict[str, torch.Tensor]:
        """Restore the files to generation `to`, bit for bit, and drop the later generations.

        Returns the restored tensors (Hugging Face name -> CPU tensor in the file's dtype)
        that the dropped generations had touched, so a caller can copy them into the
        live weights. Raises `GenerationNotFoundError` (nothing changed) when `to` is
        unknown or its undo records were pruned.
        """
        with self._mutex:
            self._require_writable()
            latest = self.latest
            if to == latest:
                return {}
            reachable = self.reachable()
            if to not in reachable:
                raise GenerationNotFoundError(
                    f"{self.path}: cannot roll back to generation {to}; reachable: "
                    f"{reachable[0]}..{reachable[-1]} (older undo records are pruned after "
                    f"{self.keep_generations} generations)")
            later = [g for g in self.generations() if g.generation > to]
            for g in later:  # the old versions of replaced files must be there before anything moves
                record = journal.UndoRecord.read(self.checkpoint_dir / _name(g.generation, ".undo"))
                for entry in record.files:
                    if entry.mode == "whole" and not (record.old_dir / entry.file).exists():
                        raise GenerationNotFoundError(
                            f"{record.old_dir / entry.file} is missing: generation {g.generation} "
                            f"cannot be undone")
            stats = fileio.WriteStats()
            for g in reversed(later):
                fileio.unlink(self.checkpoint_dir / _name(g.generation, ".json"))  # uncommit...
                fileio.fsync_dir(self.checkpoint_dir)
                self._undo_generation(g.generation, stats)  # ...then undo, as an interrupted sync
            names = sorted({name for g in later for name in g.tensors})
            return read_tensors(self.path, names)

    # ------------------------------------------------------------------ verify

    def verify(self) -> VerifyReport:
        """Re-read every tensor of every file; check the headers and sizes, and each tensor
        against the checksum its newest kept generation recorded."""
        problems = []
        for g in self.pending():
            problems.append(f"generation {g} was interrupted and is not undone yet: open {self.path} "
                            f"for writing to recover")
        try:
            layout = ModelLayout.read(self.path)
        except CheckpointError as exc:
            return VerifyReport(self.latest, 0, 0, 0, problems + [str(exc)])
        recorded: dict[str, tuple[int, str]] = {}
        for gen in reversed(self.generations()):
            for name, digest in gen.tensors.items():
                recorded.setdefault(name, (gen.generation, digest))
        checked = 0
        for file, header in layout.files.items():
            with open(self.path / file, "rb") as f:
                data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            for loc in header.tensors.values():
                try:
                    digest = hashlib.sha256(data[loc.start:loc.end]).hexdigest()
                except OSError as exc:
                    problems.append(f"{self.path / file}: tensor {loc.name} cannot be read ({exc})")
                    continue
                if loc.name in recorded:
                    checked += 1
                    g, want = recorded[loc.name]
                    if digest != want:
                        problems.append(f"{self.path / file}: tensor {loc.name} differs from what generation "
                                        f"{g} wrote (damaged, or changed outside livetrain)")
            del data
        for name, (g, _) in recorded.items():
            if name not in layout.tensors:
                problems.append(f"{self.path}: tensor {name}, written by generation {g}, is in no file")
        for g in self._numbers(".undo"):
            try:
                journal.UndoRecord.read(self.checkpoint_dir / _name(g, ".undo"))
            except CheckpointError as exc:
                problems.append(str(exc))
        return VerifyReport(self.latest, len(layout.files), len(layout.tensors), checked, problems)

    def status(self) -> dict:
        """Plain data: latest generation, what rollback can reach, disk used by undo data."""
        gens = self.generations()
        undo_bytes = sum(journal.UndoRecord.read(self.checkpoint_dir / _name(g, ".undo")).nbytes
                         for g in self._numbers(".undo"))
        latest = gens[-1] if gens and gens[-1].generation == self.latest else None
        return {
            "directory": str(self.path),
            "generation": self.latest,
            "time": latest.time if latest else None,
            "reachable": self.reachable(),
            "undo_bytes_kept": undo_bytes,
            "keep_generations": self.keep_generations,
            "interrupted": self.pending(),
        }


def _tensor_checksums(layout: ModelLayout, names: list[str], maps: Mapping[str, np.ndarray]) -> dict[str, str]:
    """SHA-256 of each named tensor's bytes; `maps`: file -> its bytes (uint8 [size])."""
    return {name: hashlib.sha256(maps[loc.file][loc.start:loc.end]).hexdigest()
            for name in names for loc in [layout.tensors[name]]}


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
