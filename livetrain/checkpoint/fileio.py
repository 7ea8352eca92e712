"""Durable file operations with byte accounting and a fault-injection point.

Every byte the checkpoint writes goes through here, so a sync can report exactly what it
wrote (model files, journal, metadata) and tests can stop the process, or fail a call,
at any chosen operation (`set_fault_hook`). OS errors come back as the checkpoint's own
exceptions, naming the file.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livetrain.checkpoint.errors import CheckpointError, DiskFullError, MissingFileError, NotWritableError

# Called before each operation as hook(op, path, **details); details hold `fd`, `data`
# and `offset` for writes. It may raise (an injected failure) or kill the process.
FaultHook = Callable[..., None]
_fault_hook: FaultHook | None = None

IOV_MAX = 1024  # buffers per pwritev call (Linux limit)


def set_fault_hook(hook: FaultHook | None) -> None:
    """Install (or remove, with None) the hook called before every write-side operation."""
    global _fault_hook
    _fault_hook = hook


def _fault(op: str, path: str | os.PathLike, **details: Any) -> None:
    if _fault_hook is not None:
        _fault_hook(op, str(path), **details)


@dataclass
class WriteStats:
    """Bytes written, by what they were written to."""

    model: int = 0      # model files: changed blocks, or whole rewritten files
    journal: int = 0    # undo records
    metadata: int = 0   # commit records
    by_file: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.model + self.journal + self.metadata

    def add(self, kind: str, path: str | os.PathLike, n: int) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        if kind == "model":
            name = Path(path).name
            self.by_file[name] = self.by_file.get(name, 0) + n


def os_error(exc: OSError, path: str | os.PathLike, doing: str) -> CheckpointError:
    """The checkpoint exception for an OS error met while `doing` something to `path`."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on the device while {doing} {path}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return NotWritableError(f"cannot write {path} ({exc.strerror}) while {doing} it")
    if exc.errno == errno.ENOENT:
        return MissingFileError(f"{path} does not exist ({doing} it)")
    return CheckpointError(f"{doing} {path} failed: {exc}")


@contextmanager
def translated(path: str | os.PathLike, doing: str) -> Iterator[None]:
    """Raise OS errors inside the block as checkpoint exceptions naming `path`."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, path, doing) from exc


def open_fd(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    with translated(path, "opening"):
        _fault("open", path, flags=flags)
        return os.open(path, flags | os.O_CLOEXEC, mode)


def map_readonly(fd: int, size: int) -> np.ndarray:
    """The file's bytes, mapped shared and read-only (they follow later writes to the file).

    Pages are mapped up front (MAP_POPULATE): faulting a cached file in 4 KiB at a time
    cost as much as the comparison itself. The map is released when the array is.
    """
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ), dtype=np.uint8)


def map_path(path: str | os.PathLike) -> np.ndarray:
    """The bytes of the file at `path`, mapped read-only (see `map_readonly`)."""
    with translated(path, "reading"):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return map_readonly(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)


def write_all(fd: int, data: bytes | memoryview, path: str | os.PathLike, kind: str, stats: WriteStats) -> None:
    """Append `data` at the fd's position, all of it."""
    view = memoryview(data).cast("B")
    with translated(path, "writing"):
        _fault("write", path, fd=fd, data=view, offset=None)
        while view:
            n = os.write(fd, view)
            stats.add(kind, path, n)
            view = view[n:]


def pwritev_all(fd: int, buffers: Sequence[bytes | bytearray | memoryview], offset: int,
                path: str | os.PathLike, kind: str, stats: WriteStats) -> None:
    """Write consecutive `buffers` (bytes-like, format "B") at `offset`, all of them
    (short writes resumed)."""
    for start in range(0, len(buffers), IOV_MAX):
        group = buffers[start:start + IOV_MAX]
        size = sum(len(b) for b in group)
        with translated(path, "writing"):
            _fault("pwrite", path, fd=fd, data=group, offset=offset)
            done = 0
            while done < size:
                n = os.pwritev(fd, _skip(group, done), offset + done)
                stats.add(kind, path, n)
                done += n
        offset += size


def _skip(buffers: Sequence[bytes | bytearray | memoryview], n: int) -> Sequence[bytes | bytearray | memoryview]:
    """`buffers` without their first `n` bytes."""
    if n == 0:
        return buffers
    out = []
    for b in buffers:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(memoryview(b)[n:])
        n = 0
    return out


def fsync(fd: int, path: str | os.PathLike, data_only: bool = False) -> None:
    """Make the file's writes durable; `data_only` (fdatasync) skips metadata that
    reading the data back does not need (times), for writes that keep the size."""
    with translated(path, "flushing"):
        _fault("fsync", path, fd=fd)
        (os.fdatasync if data_only else os.fsync)(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames, creations and removals inside folder `path` durable."""
    with translated(path, "flushing folder"):
        _fault("fsync_dir", path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Atomically rename `src` over `dst`."""
    with translated(dst, "renaming onto"):
        _fault("rename", dst, src=str(src))
        os.replace(src, dst)


def link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A second name `dst` for the file `src` (no bytes copied)."""
    with translated(dst, "linking"):
        _fault("link", dst, src=str(src))
        os.link(src, dst)


def unlink(path: str | os.PathLike) -> None:
    """Remove a file; a missing one is fine."""
    try:
        _fault("unlink", path)
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise os_error(exc, path, "removing") from exc


def write_file_durably(path: Path, data: bytes, kind: str, stats: WriteStats) -> None:
    """Write `path` whole via a temporary file: fsync, rename into place, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    fd = open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(fd, data, tmp, kind, stats)
        fsync(fd, tmp)
    except BaseException:
        os.close(fd)
        unlink(tmp)
        raise
    os.close(fd)
    replace(tmp, path)
    fsync_dir(path.parent)
