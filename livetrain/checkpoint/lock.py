"""One writer per model directory: an exclusive ``flock`` on ``DIR/.livetrain/lock``.

A server, an offline trainer and a rollback each write the directory's safetensors
files and ``.livetrain/`` state; two of them at once would interleave syncs. Whoever
opens a `ModelDirectory` for writing takes this lock, naming itself, so the next one is
told who holds it. The lock dies with its process (the kernel drops it), so a crash
never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from livetrain.checkpoint.errors import DirectoryInUse

STATE_DIRNAME = ".livetrain"


class DirectoryLock:
    """An exclusive, non-blocking lock on a model directory, held until :meth:`release`."""

    def __init__(self, model_dir: str | os.PathLike, holder: str) -> None:
        self.model_dir = Path(model_dir)
        self.path = self.model_dir / STATE_DIRNAME / "lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe_holder(fd)
            os.close(fd)
            raise DirectoryInUse(
                f"{self.model_dir} is in use by {who}; stop that process first "
                "(or work on a copy of the directory)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "parent": os.getppid(), "holder": holder,
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # The file stays: unlinking it would let a waiter lock an orphaned inode.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(model_dir: str | os.PathLike) -> dict | None:
    """Who holds the directory's lock: ``{pid, parent, holder, since}`` (``parent``: the pid
    of the process that had started it when it took the lock), or None if nobody does."""
    path = Path(model_dir) / STATE_DIRNAME / "lock"
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}") or None
    except ValueError:
        return None


def _describe_holder(fd: int) -> str:
    info = _read_holder(fd) or {}
    try:
        return f"{info['holder']} (pid {info['pid']}, since {info['since']})"
    except KeyError:
        return "another livetrain process"
