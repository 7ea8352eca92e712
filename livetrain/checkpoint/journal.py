"""Undo records: what it takes to bring changed blocks back to their old bytes.

An undo record ``<generation>.undo`` is written (to a temporary name, fsync'd, renamed,
folder fsync'd) before any model-file byte changes. Its layout::

    b"LTUNDO01" | u32 little-endian N | N bytes of JSON header | one zstd frame

The header lists the files: ``{"generation": g, "block_size": 4096, "checksum": "crc32"
| "sha256", "files": [{"file", "mode": "blocks", "size", "blocks": k} | {"file", "mode":
"whole"}]}``. For each ``blocks`` file, in order, the zstd frame holds k block indices
(u64), k checksums of the old blocks, k checksums of the new blocks (4 bytes of CRC-32,
or 8 of SHA-256), then the XOR of old and new content of each block. A small update of bf16 weights leaves most
bits equal, so the XOR is mostly zeros and compresses to a few % of the blocks.

Undoing a block looks at what the file holds now: the old checksum → nothing to do; the
new checksum → XOR it back; neither → a torn write (some 512-byte sectors new, some
old): every mix of sectors is tried until one matches the old checksum. A ``whole`` file
was replaced by rename; its previous version is kept as ``<generation>.old/<file>`` (a
hard link: no bytes copied) and undoing renames it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from livetrain.checkpoint import fileio
from livetrain.checkpoint.block_diff import BLOCK_SIZE, ChangedBlocks
from livetrain.checkpoint.errors import DamagedFileError, RecoveryError

MAGIC = b"LTUNDO01"
SECTOR = 512
# Level 1: the XOR of a bf16 update is mostly zero bytes, which it compresses about as
# small as higher levels do, and faster.
ZSTD_LEVEL = 1
ZSTD_THREADS = 2  # zstd compresses in 2 worker threads of its own (the frame is the same format)
STAGING_BLOCKS = 256  # XOR data is handed to zstd 1 MiB at a time
UNDO_ESTIMATE_STRIDE = 16  # estimate_undo_bytes compresses every 16th block


def _crc32(data) -> bytes:
    return zlib.crc32(data).to_bytes(4, "little")


def _sha256_8(data) -> bytes:
    return hashlib.sha256(data).digest()[:8]


# Block checksums, by name. CRC-32 (as ext4's journal uses) is the faster; a record
# in which some block's old and new CRC-32 coincide (odds 2^-32 per block) uses SHA-256
# instead, since recovery must tell those two apart.
CHECKSUMS = {"crc32": (_crc32, 4), "sha256": (_sha256_8, 8)}


@dataclass(frozen=True)
class UndoFile:
    """One file of an undo record."""

    file: str
    mode: str  # "blocks" (changed blocks written in place) or "whole" (file replaced)
    size: int = 0
    blocks: int = 0


@dataclass(frozen=True)
class UndoRecord:
    """The header of an undo record, and where its payload starts."""

    path: Path
    generation: int
    files: tuple[UndoFile, ...]
    payload_start: int
    checksum: str  # a key of CHECKSUMS

    @property
    def old_dir(self) -> Path:
        """Where the previous versions of ``whole`` files are kept."""
        return self.path.with_suffix(".old")

    @property
    def nbytes(self) -> int:
        """Disk bytes of this record, old versions of replaced files included."""
        total = self.path.stat().st_size
        if self.old_dir.is_dir():
            total += sum(p.stat().st_size for p in self.old_dir.iterdir())
        return total

    @classmethod
    def read(cls, path: Path) -> UndoRecord:
        try:
            with open(path, "rb") as f:
                magic, (n,) = f.read(8), struct.unpack("<I", f.read(4))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as exc:
            raise DamagedFileError(f"{path}: unreadable undo record ({exc})") from None
        if magic != MAGIC or header.get("block_size") != BLOCK_SIZE or header.get("checksum") not in CHECKSUMS:
            raise DamagedFileError(f"{path}: not an undo record of this version")
        files = tuple(UndoFile(**f) for f in header["files"])
        return cls(path, header["generation"], files, 12 + n, header["checksum"])


class _JournalWriter:
    """A file object for zstd's output that writes through `fileio` (counted, hookable)."""

    def __init__(self, fd: int, path: Path, stats: fileio.WriteStats):
        self.fd, self.path, self.stats = fd, path, stats

    def write(self, data: bytes) -> int:
        fileio.write_all(self.fd, data, self.path, "journal", self.stats)
        return len(data)


def write_undo_record(path: Path, generation: int, changes: Iterable[ChangedBlocks],
                      whole_files: Iterable[str], stats: fileio.WriteStats) -> None:
    """Write and make durable the undo record of one sync (see the module docstring).

    `changes` are the in-place files (their `old` arrays still hold the old bytes);
    `whole_files` are replaced whole. On failure the temporary file is removed.
    """
    changes = list(changes)
    files = [{"file": c.file, "mode": "blocks", "size": c.size, "blocks": len(c.blocks)} for c in changes]
    files += [{"file": f, "mode": "whole"} for f in whole_files]
    checksum = "crc32"
    sums = [_block_sums(c, checksum) for c in changes]
    if any(_sums_collide(old, new, CHECKSUMS[checksum][1]) for old, new in sums):
        checksum = "sha256"
        sums = [_block_sums(c, checksum) for c in changes]
    header = json.dumps({"generation": generation, "block_size": BLOCK_SIZE, "checksum": checksum,
                         "files": files}).encode()
    tmp = path.with_name(path.name + ".tmp")
    fd = fileio.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        out = _JournalWriter(fd, tmp, stats)
        out.write(MAGIC + struct.pack("<I", len(header)) + header)
        compressor = _compressor()
        for change, (old_sums, new_sums) in zip(changes, sums):
            for data in _undo_payload(change, old_sums, new_sums):
                chunk = compressor.compress(data)
                if chunk:
                    out.write(chunk)
        out.write(compressor.flush())
        fileio.fsync(fd, tmp)
    except BaseException:
        os.close(fd)
        fd = -1
        _remove_quietly(tmp)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    fileio.replace(tmp, path)
    fileio.fsync_dir(path.parent)


def _block_sums(change: ChangedBlocks, checksum: str) -> tuple[bytes, bytes]:
    """Checksums of the old and of the new content of each changed block, in block order."""
    fn = CHECKSUMS[checksum][0]
    indices = sorted(change.blocks)
    old = change.old  # slicing clips the file's last block where it is short
    old_sums = b"".join([fn(old[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]) for i in indices])
    new_sums = b"".join([fn(change.blocks[i]) for i in indices])
    return old_sums, new_sums


def _sums_collide(old_sums: bytes, new_sums: bytes, width: int) -> bool:
    """Whether some block's old and new checksum (`width` bytes each) are equal."""
    word = np.dtype(f"V{width}")
    return bool((np.frombuffer(old_sums, dtype=word) == np.frombuffer(new_sums, dtype=word)).any())


def _undo_payload(change: ChangedBlocks, old_sums: bytes, new_sums: bytes,
                  stride: int = 1) -> Iterator[bytes | np.ndarray]:
    """One file's part of the zstd frame: indices, old and new checksums, XOR data
    (of every `stride`-th block only, for an estimate), the XOR in pieces of at most
    `STAGING_BLOCKS` blocks (uint8 [<= 256 * 4096])."""
    indices = sorted(change.blocks)
    yield np.asarray(indices, dtype="<u8").tobytes()
    yield old_sums
    yield new_sums
    indices = indices[::stride]
    for g in range(0, len(indices), STAGING_BLOCKS):
        group = indices[g:g + STAGING_BLOCKS]
        old = np.concatenate([change.old[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] for i in group])
        new = np.concatenate([np.frombuffer(change.blocks[i], dtype=np.uint8) for i in group])
        yield np.bitwise_xor(old, new, out=new)


def estimate_undo_bytes(change: ChangedBlocks) -> int:
    """About the compressed size of one file's undo data, from every 16th block's XOR
    (checksums counted at full width, without computing them); nothing is written."""
    width = CHECKSUMS["crc32"][1] * len(change.blocks)
    compressor = _compressor()
    sampled = sum(len(compressor.compress(data)) for data in
                  _undo_payload(change, b"", b"", stride=UNDO_ESTIMATE_STRIDE)) + len(compressor.flush())
    return 2 * width + sampled * UNDO_ESTIMATE_STRIDE


def _compressor() -> zstandard.ZstdCompressionObj:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS).compressobj()


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _PayloadReader:
    """Reads exact byte counts from an undo record's zstd frame."""

    def __init__(self, record: UndoRecord, f):
        f.seek(record.payload_start)
        self.record = record
        self.reader = zstandard.ZstdDecompressor().stream_reader(f)

    def read(self, n: int) -> bytes:
        parts, want = [], n
        while want:
            chunk = self.reader.read(want)
            if not chunk:
                raise DamagedFileError(f"{self.record.path}: undo record ends early")
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)


def undo(record: UndoRecord, directory: Path, stats: fileio.WriteStats) -> list[str]:
    """Bring every file of `record` back to its state before that sync; returns the files
    whose bytes were changed back. Idempotent: safe to run again after a crash in it."""
    restored = []
    with open(record.path, "rb") as f:
        payload = _PayloadReader(record, f)
        for entry in record.files:
            path = directory / entry.file
            if entry.mode == "blocks":
                if _undo_blocks(entry, path, payload, record, stats):
                    restored.append(entry.file)
            else:
                old = record.old_dir / entry.file
                if old.exists():  # else the file was never replaced: it is the old one
                    fileio.replace(old, path)
                    fileio.fsync_dir(directory)
                    restored.append(entry.file)
    return restored


def _undo_blocks(entry: UndoFile, path: Path, payload: _PayloadReader, record: UndoRecord,
                 stats: fileio.WriteStats) -> bool:
    k = entry.blocks
    checksum, width = CHECKSUMS[record.checksum]
    indices = np.frombuffer(payload.read(8 * k), dtype="<u8").tolist()
    old_sums = payload.read(width * k)
    new_sums = payload.read(width * k)
    fd = fileio.open_fd(path, os.O_RDWR)
    wrote = False
    try:
        if os.fstat(fd).st_size != entry.size:
            raise RecoveryError(
                f"{path}: {os.fstat(fd).st_size} bytes, but generation {record.generation} left it "
                f"{entry.size}; the undo record {record.path} is kept")
        current = fileio.map_readonly(fd, entry.size)
        for n, i in enumerate(indices):
            start = i * BLOCK_SIZE
            stop = min(start + BLOCK_SIZE, entry.size)
            delta = np.frombuffer(payload.read(stop - start), dtype=np.uint8)
            block = current[start:stop]
            have = checksum(block)
            old_sum = old_sums[n * width:(n + 1) * width]
            if have == old_sum:
                continue
            if have == new_sums[n * width:(n + 1) * width]:
                old = block ^ delta
            else:
                old = _untear(block, delta, old_sum, checksum)
                if old is None:
                    raise RecoveryError(
                        f"{path}: block {i} (bytes {start}..{stop}) holds neither the bytes of "
                        f"generation {record.generation} nor those before it; the file was changed "
                        f"outside livetrain. The undo record {record.path} is kept")
            fileio.pwritev_all(fd, [old.tobytes()], start, path, "model", stats)
            wrote = True
        if wrote:
            fileio.fsync(fd, path)
    finally:
        os.close(fd)
    return wrote


def _untear(block: np.ndarray, delta: np.ndarray, old_sum: bytes, checksum) -> np.ndarray | None:
    """The old block from a torn one: XOR back the sectors that hold new bytes.

    Tries each mix of the block's 512-byte sectors (at most 2^8) against the old checksum.
    """
    sectors = [(s, min(s + SECTOR, block.shape[0])) for s in range(0, block.shape[0], SECTOR)
               if delta[s:s + SECTOR].any()]
    for mask in range(1, 2 ** len(sectors)):
        candidate = block.copy()
        for bit, (s, e) in enumerate(sectors):
            if mask >> bit & 1:
                candidate[s:e] ^= delta[s:e]
        if checksum(candidate) == old_sum:
            return candidate
    return None
