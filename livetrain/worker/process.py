"""Starting and stopping a training worker from another process (`livetrain serve`, tests).

:class:`WorkerProcess` runs ``python -m livetrain.worker`` (`livetrain.worker.main`) as a
child: it makes a private runtime directory (mode 0700) for the ``ipc://`` socket, waits
until the worker answers, and stops it. The worker and its starter share two marks:
`SYNCED_MARK` (in the shared copy: everything applied to it is in the model directory)
and `ABANDONED_MARK` (in the runtime directory: the starter exits without waiting).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from livetrain.cpus import format_cpus
from livetrain.options import TrainerOptions
from livetrain.worker import protocol
from livetrain.worker.connection import call_worker
from livetrain.worker.protocol import WorkerError

log = logging.getLogger(__name__)
SOCKET_NAME = "worker.sock"
SYNCED_MARK = "synced"  # in the shared copy: everything applied to it is in the model directory
ABANDONED_MARK = "abandoned"  # in the runtime directory: the worker's starter exits without waiting for it
RUNTIME_DIR_PREFIX = "livetrain-run-"


def runtime_base() -> Path:
    """Where runtime directories are made: $XDG_RUNTIME_DIR if set, else the temporary directory."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())


def new_runtime_dir() -> Path:
    """A private (0700) directory for the worker's socket, under :func:`runtime_base`, named
    after this process, so that one left behind by a process that is gone can be told apart
    (`livetrain.leftovers`)."""
    runtime_dir = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_DIR_PREFIX}{os.getpid()}-", dir=runtime_base()))
    os.chmod(runtime_dir, 0o700)
    return runtime_dir


def worker_address(runtime_dir: str | os.PathLike) -> str:
    """The ZMQ address of the worker whose socket lives in ``runtime_dir``."""
    return f"ipc://{Path(runtime_dir) / SOCKET_NAME}"


class WorkerProcess:
    """A training worker started as a child process, reachable at :attr:`address`."""

    def __init__(self, popen: subprocess.Popen, runtime_dir: Path, owns_runtime_dir: bool) -> None:
        self.popen = popen
        self.runtime_dir = runtime_dir
        self.owns_runtime_dir = owns_runtime_dir  # remove it on stop (a caller's is left alone)
        self.address = worker_address(runtime_dir)

    @classmethod
    def start(cls, model_dir: str | os.PathLike, trainer: TrainerOptions = TrainerOptions(), *,
              ready_timeout_s: float = 300.0, **options: Any) -> "WorkerProcess":
        """Start ``python -m livetrain.worker`` (arguments as for :meth:`spawn`) and wait
        until it answers ``status``."""
        worker = cls.spawn(model_dir, trainer, **options)
        try:
            worker.wait_ready(ready_timeout_s)
        except BaseException:
            worker.stop(timeout_s=10)
            raise
        return worker

    @classmethod
    def spawn(cls, model_dir: str | os.PathLike, trainer: TrainerOptions = TrainerOptions(), *,
              threads: int | None = None, shared_copy: str | os.PathLike | None = None,
              runtime_dir: str | os.PathLike | None = None,
              idle: bool = False, cpus: Iterable[int] | None = None, env: dict[str, str] | None = None,
              log_path: str | os.PathLike | None = None, wait_for_go: bool = False) -> "WorkerProcess":
        """Start ``python -m livetrain.worker``; do not wait for it.

        ``trainer``: how it trains (`TrainerOptions`, passed on its command line).
        ``runtime_dir``: a directory from :func:`new_runtime_dir` when the address must be
        known beforehand (vLLM's plugin is told it before the worker starts); it is
        removed by :meth:`stop`. ``shared_copy``: train the served weights (see
        ``--shared-copy``). ``idle``: every worker thread runs under ``SCHED_IDLE``.
        ``cpus``: the cores every worker thread runs on (default: any).
        ``log_path``: append the worker's output there instead of inheriting this process's.
        ``wait_for_go``: the worker imports, then waits for :meth:`go` before it opens the
        weights (so its start-up overlaps vLLM's).
        """
        owns_runtime_dir = runtime_dir is None
        runtime_dir = new_runtime_dir() if owns_runtime_dir else Path(runtime_dir)
        command = [sys.executable, "-m", "livetrain.worker", "--model-dir", str(model_dir),
                   "--address", worker_address(runtime_dir), "--runtime-dir", str(runtime_dir),
                   "--parent-pid", str(os.getpid()), *trainer.to_argv()]
        if threads is not None:
            command += ["--threads", str(threads)]
        if shared_copy is not None:
            command += ["--shared-copy", str(shared_copy)]
        if idle:
            command.append("--idle")
        if cpus is not None:
            command += ["--cpus", format_cpus(cpus)]
        if wait_for_go:
            command.append("--wait-for-go")
        stdin = subprocess.PIPE if wait_for_go else None if log_path is None else subprocess.DEVNULL
        if log_path is None:
            popen = subprocess.Popen(command, env=env, stdin=stdin)
        else:
            with open(log_path, "ab") as log_file:
                popen = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=stdin)
        return cls(popen, runtime_dir, owns_runtime_dir)

    def go(self) -> None:
        """Let a worker spawned with ``wait_for_go`` open the weights and start serving."""
        self.popen.stdin.write(b"go\n")
        self.popen.stdin.close()

    @property
    def waiting_for_go(self) -> bool:
        """Spawned with ``wait_for_go`` and neither told :meth:`go` nor stopped: it has opened nothing."""
        return self.popen.stdin is not None and not self.popen.stdin.closed

    def running(self) -> bool:
        """Whether the process has not exited (reaps it if it has)."""
        return self.popen.poll() is None

    def request(self, op: str, args: dict[str, Any] | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
        """One request; fails with ``worker_stopped`` as soon as the process exits without answering."""
        return call_worker(self.address, op, args, timeout_s=timeout_s, alive=self.running)

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"the training worker exited with status {self.popen.returncode} "
                                   "before it was ready (its log is above)")
            try:
                return self.request("status", timeout_s=1.0)
            except WorkerError as exc:
                if exc.code != "worker_stopped" and (exc.type != protocol.TIMEOUT or time.monotonic() > deadline):
                    raise

    def stop(self, timeout_s: float = 120.0) -> int:
        """Ask for a clean shutdown (finish the step, sync) and wait for the exit; SIGTERM,
        then SIGKILL, when the worker does not answer or exit within ``timeout_s``. A worker
        that stops by itself meanwhile (it got the same signal as this process) is noticed
        at once and reaped. A worker still waiting for :meth:`go` is told to exit by the
        end of its input. Returns the exit status (0: everything it applied is synced)."""
        if self.waiting_for_go:
            self.popen.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout_s)
        if self.popen.poll() is None:
            try:
                self.request("shutdown", timeout_s=timeout_s)
            except WorkerError as exc:
                # Any other failure means it is stopping, or has stopped, by itself: wait for it.
                if exc.type == protocol.TIMEOUT:
                    log.warning("%s; terminating the training worker", exc.message)
                    self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.owns_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return self.popen.returncode
