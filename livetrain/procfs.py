"""What Linux's ``/proc`` says about processes: process groups, who listens on a port, who
maps a ``/dev/shm`` file, a command line, an environment.

`livetrain serve` uses it to stop vLLM's whole process group, and to find what a server
that did not stop cleanly left behind. A process that exits while it is being read, or
that this user may not inspect, is skipped (or described as unknown).
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
LISTEN = "0A"  # TCP state in /proc/net/tcp{,6}


def pids() -> list[int]:
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, parent pid, process group)`` of ``pid``; None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    state, ppid, pgrp = text[text.rindex(")") + 2:].split()[:3]
    return state, int(ppid), int(pgrp)


def running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie has)."""
    info = stat(pid)
    return info is not None and _running(pid, info[0])


def group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that have not exited."""
    members = []
    for pid in pids():
        info = stat(pid)
        if info is not None and info[2] == pgid and _running(pid, info[0]):
            members.append(pid)
    return members


def _running(pid: int, state: str) -> bool:
    if state != "Z":
        return True
    # The main thread of an exiting process is a zombie while its other threads still exit
    # (unmapping memory, closing sockets): the process is gone once they are.
    try:
        return len(os.listdir(PROC / str(pid) / "task")) > 1
    except OSError:
        return False


def command_line(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def environment(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (empty if it cannot be read)."""
    try:
        entries = (PROC / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    env = {}
    for entry in entries:
        name, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            env[name] = value
    return env


def listeners(port: int) -> set[int]:
    """The processes holding a listening TCP socket on ``port`` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    return {pid for pid in pids() if inodes & _open_files(pid)} if inodes else set()


def mapped_shm_files(of: set[int] | None = None) -> set[str]:
    """The ``/dev/shm`` files (still linked) mapped by the processes ``of`` (default: every process)."""
    mapped = set()
    for pid in pids() if of is None else of:
        try:
            lines = (PROC / str(pid) / "maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            path = line.split(None, 5)[-1]
            if path.startswith("/dev/shm/") and not path.endswith(" (deleted)"):
                mapped.add(path)
    return mapped


def _open_files(pid: int) -> set[str]:
    fd_dir = PROC / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return set()
    targets = set()
    for name in names:
        try:
            targets.add(os.readlink(fd_dir / name))
        except OSError:
            continue
    return targets
