"""The sync write path: live tensors -> changed blocks -> undo record -> files -> commit.

A sync compares the live tensors with the files (`block_diff`), writes an undo record
(`journal`) and makes it durable, then changes the files (the changed 4 KiB blocks in
place, or a file rewritten whole and renamed over the old one when that writes fewer
bytes) and makes them durable, then commits the generation with its commit record.
A failure at any point takes back what was done; a crash is undone by the next open.
"""

from __future__ import annotations

import hashlib
import json
import os
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
from livetrain.checkpoint.errors import DIRECTORY_ERRORS
from livetrain.checkpoint.generations import GenerationFiles
from livetrain.formats.safetensors_layout import ModelLayout


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


class SyncWriter:
    """Writes syncs of one model directory as new generations (see the module).

    Keeps each file's read-only map between syncs while the file is the same inode and
    size: mapping a file costs about as much as comparing it, and a shared map sees every
    in-place write. A file replaced by rename gets a new map.
    """

    def __init__(self, files: GenerationFiles) -> None:
        self.files = files
        self.path = files.path
        # file -> ((st_dev, st_ino, size), uint8 [size] read-only shared map)
        self._maps: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}

    def close(self) -> None:
        self._maps.clear()

    def sync(self, live: Mapping[str, torch.Tensor], name_map: NameMap | None) -> SyncResult:
        """Write the blocks of the files that differ from ``live`` as a new generation."""
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
                return SyncResult(self.files.latest, 0, 0, [], time.perf_counter() - t0)
            g = self.files.latest + 1
            modes = {file: _choose_mode(change) for file, change in changes.items()}
            tensors = self._write_generation(g, changes, modes, fds, stats, layout, touched)
            blocks = sum(len(c.blocks) for c in changes.values())
            try:
                files = {f: {"mode": modes[f], "blocks_changed": len(c.blocks),
                             "bytes_written": stats.by_file.get(f, 0)} for f, c in changes.items()}
                undo_bytes = journal.UndoRecord.read(self.files.file(g, ".undo")).nbytes
                self._commit(g, stats, blocks, files, tensors, undo_bytes, t0)
            except BaseException:
                self._abort(g)
                raise
            self.files.prune()
            return SyncResult(g, stats.total, blocks, sorted(touched), time.perf_counter() - t0,
                              stats.model, stats.journal, stats.metadata,
                              sum(c.nbytes for c in changes.values()), modes)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _mapped(self, file: str, fd: int) -> np.ndarray:
        """The file's bytes, mapped read-only and shared (uint8 [size])."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_size)
        kept = self._maps.get(file)
        if kept is None or kept[0] != key:
            kept = self._maps[file] = (key, fileio.map_readonly(fd, st.st_size))
        return kept[1]

    def _write_generation(self, g: int, changes: dict[str, ChangedBlocks], modes: dict[str, str],
                          fds: dict[str, int], stats: fileio.WriteStats, layout: ModelLayout,
                          touched: set[str]) -> dict[str, str]:
        """Undo record first (durable), then the file changes (durable); on a failure the
        changes made so far are undone before the error goes on. Returns the SHA-256 of
        each touched tensor as now in the files: the in-place files' tensors are hashed
        while those files are being flushed to disk."""
        in_place = [c for f, c in changes.items() if modes[f] == "blocks"]
        whole = [c for f, c in changes.items() if modes[f] == "whole"]
        staging = self.files.file(g, ".new")
        record_path = self.files.file(g, ".undo")
        try:
            for change in whole:
                self._write_whole_file(change, staging / change.file, stats)
            journal.write_undo_record(record_path, g, in_place, [c.file for c in whole], stats)
        except BaseException:
            self.files.remove(staging)
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
                fileio.fsync_dir(self.files.folder)
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
                fileio.unlink(self.files.file(g, suffix))
            self.files.undo_uncommitted(g, fileio.WriteStats())
        except DIRECTORY_ERRORS:
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
        fileio.write_file_durably(self.files.file(g, ".json"), data, "metadata", stats)


def _choose_mode(change: ChangedBlocks) -> str:
    """"blocks" (write changed blocks in place, undo data in the journal) or "whole"
    (rewrite the file, keep the old one by hard link: no undo bytes written), by which
    writes fewer bytes. The undo data is only compressed to count it when it could
    tip the balance."""
    changed = change.nbytes
    if 2 * changed <= change.size:
        return "blocks"
    return "whole" if change.size < changed + journal.estimate_undo_bytes(change) else "blocks"


def _tensor_checksums(layout: ModelLayout, names: list[str], maps: Mapping[str, np.ndarray]) -> dict[str, str]:
    """SHA-256 of each named tensor's bytes; `maps`: file -> its bytes (uint8 [size])."""
    return {name: hashlib.sha256(maps[loc.file][loc.start:loc.end]).hexdigest()
            for name in names for loc in [layout.tensors[name]]}
