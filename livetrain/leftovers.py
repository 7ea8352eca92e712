"""What a `livetrain serve` that did not stop cleanly can leave behind, found before the next one starts.

* The shared copy of the served weights in /dev/shm, kept when a sync could not run: the
  next server on the same directory serves it and syncs it (`LiveServer` says so).
* The training worker of a server whose supervisor was killed, still holding the
  directory's lock while it finishes its step and syncs: it exits by itself within
  seconds, so the next server waits for it (:func:`wait_for_orphaned_lock_holder`).
* Runtime directories (the worker's socket, the admin token) of servers that are gone:
  removed (:func:`remove_stale_runtime_dirs`).
* A vLLM that outlived its supervisor and still holds the port: named, with the command
  that stops it (:func:`check_port_free`).

The directory lock itself is an ``flock``, which dies with its holder: it is never stale.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from livetrain import procfs
from livetrain.checkpoint.lock import lock_holder
from livetrain.vllm_plugin.supervision import SUPERVISOR_PID_ENV
from livetrain.worker.process import RUNTIME_DIR_PREFIX, runtime_base

ORPHAN_WAIT_S = 120.0
ORPHAN_POLL_S = 0.2


class PortInUse(RuntimeError):
    """Another process listens on the port `livetrain serve` was asked to serve on."""


def check_port_free(host: str, port: int) -> None:
    """Raise `PortInUse`, naming the process that holds the port and what to do about
    it, if vLLM could not listen on ``host:port`` (bound as vLLM binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return  # not this check's business: vLLM reports a bad address itself
            raise PortInUse(describe_port_holder(port)) from None


def describe_port_holder(port: int) -> str:
    """Who listens on ``port``, and how to free it."""
    holders = sorted(procfs.listeners(port))
    if not holders:
        return f"port {port} is in use (by a process this user cannot inspect): serve on another --port"
    pid = holders[0]
    what = f"port {port} is held by pid {pid} ({procfs.command_line(pid)[:100]}"
    supervisor = procfs.environment(pid).get(SUPERVISOR_PID_ENV)
    info = procfs.stat(pid)
    if supervisor is None or info is None:
        return f"{what}): stop it, or serve on another --port"
    group = info[2]
    leader = procfs.stat(group)
    if leader is not None and leader[1] == int(supervisor):
        return (f"{what}, the vLLM of a livetrain serve that is running, pid {supervisor}): stop that server "
                "first, or serve on another --port")
    return (f"{what}, a vLLM started by a livetrain serve (pid {supervisor}) that is gone): "
            f"stop it with kill -TERM -- -{group}")


def wait_for_orphaned_lock_holder(model_dir: Path, say: Callable[[str], None],
                                  timeout_s: float = ORPHAN_WAIT_S) -> None:
    """If the directory's lock is held by a process whose starter is gone (the training
    worker of a server that was killed, finishing its step and its sync), wait up to
    ``timeout_s`` for it to exit. Any other holder is left to the lock's own error."""
    holder = lock_holder(model_dir)
    if holder is None or "parent" not in holder:
        return
    pid = holder["pid"]
    info = procfs.stat(pid)
    if info is None or info[0] == "Z" or info[1] == holder["parent"]:
        return
    say(f"{model_dir} is held by {holder['holder']} (pid {pid}), whose server is gone: it syncs and exits "
        "by itself; waiting for it")
    deadline = time.monotonic() + timeout_s
    while procfs.running(pid) and time.monotonic() < deadline:
        time.sleep(ORPHAN_POLL_S)


def remove_stale_runtime_dirs() -> list[Path]:
    """Remove this user's runtime directories (the worker's socket, the admin token) whose
    creator has exited; returns them."""
    pattern = re.compile(re.escape(RUNTIME_DIR_PREFIX) + r"(\d+)-\w+")
    removed = []
    for path in runtime_base().glob(RUNTIME_DIR_PREFIX + "*"):
        match = pattern.fullmatch(path.name)
        try:
            mine = path.is_dir() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if match and mine and not procfs.running(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
