"""A `livetrain serve` process tree started as a deployment starts it (its command line, in a
session of its own) and stopped each way a deployment stops it. Used by
tests/test_serve_stops.py and bench/stops.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from livetrain import procfs
from tests.session_helpers import free_port

# The ways, in the order the stop tests and the bench run them.
STOP_WAYS = {
    "sigint-group": "SIGINT to the process group (Ctrl-C)",
    "sigterm-group": "SIGTERM to the process group (kill -TERM -- -PGID)",
    "sigterm-all": "SIGTERM to every process (systemd's KillMode=control-group)",
    "sigterm-supervisor": "SIGTERM to the supervisor alone (KillMode=mixed, docker stop)",
    "sigkill-supervisor": "SIGKILL of the supervisor (kill -9, the OOM killer)",
    "sigkill-worker-during-stop": "SIGKILL of the training worker during a stop",
    "sigkill-vllm-during-stop": "SIGKILL of vLLM's API server during a stop",
}
POLL_S = 0.02


@dataclass
class ServeTree:
    """A running `livetrain serve`: the supervisor, its training worker, vLLM's API server
    (the leader of vLLM's process group) and every process of the tree when it was ready."""

    serve: subprocess.Popen
    port: int
    log_path: Path
    worker: int
    vllm: int
    runtime_dir: Path
    pids: set[int]
    gone_after: dict[int, float] = field(default_factory=dict)

    @classmethod
    def start(cls, model_dir: Path, log_path: Path, serve_args: tuple[str, ...] = (),
              vllm_args: tuple[str, ...] = (), until: str = "OpenAI API at", timeout_s: float = 600) -> "ServeTree":
        """``livetrain serve --model DIR --port P SERVE_ARGS -- VLLM_ARGS``; returns once its
        output says ``until`` (by default: it is ready) and both children have started."""
        port = free_port()
        with open(log_path, "w") as log:
            serve = subprocess.Popen([sys.executable, "-m", "livetrain.cli", "serve", "--model", str(model_dir),
                                      "--port", str(port), *serve_args, "--", *vllm_args],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while until not in log_path.read_text() or len(children := cls._children(serve.pid)) < 2:
            if serve.poll() is not None or time.monotonic() > deadline:
                serve.kill()
                raise RuntimeError(f"livetrain serve did not get to {until!r}:\n{log_path.read_text()}")
            time.sleep(0.2)
        worker = next(pid for pid in children if "livetrain.worker" in procfs.command_line(pid))
        vllm = next(pid for pid in children if procfs.stat(pid)[2] == pid)
        arguments = procfs.command_line(worker).split()
        runtime_dir = Path(arguments[arguments.index("--runtime-dir") + 1])
        pids = {serve.pid, worker, *procfs.group_members(vllm)}
        return cls(serve, port, log_path, worker, vllm, runtime_dir, pids)

    @staticmethod
    def _children(pid: int) -> list[int]:
        return [child for child in procfs.pids() if (procfs.stat(child) or ("", 0, 0))[1] == pid]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, way: str, hold_victim: bool = True) -> float:
        """Stop the tree ``way`` (a key of `STOP_WAYS`); returns the ``time.monotonic()`` of
        the first signal. For a SIGKILL during a stop the victim is SIGKILLed once the
        supervisor says it is stopping; ``hold_victim`` SIGSTOPs it before the stop begins,
        so that the SIGKILL surely finds it before it is done (a worker before its sync)."""
        victim = {"sigkill-worker-during-stop": self.worker, "sigkill-vllm-during-stop": self.vllm}.get(way)
        if victim is not None and hold_victim:
            os.kill(victim, signal.SIGSTOP)
        started = time.monotonic()
        if way == "sigint-group":
            os.killpg(self.serve.pid, signal.SIGINT)
        elif way == "sigterm-group":
            os.killpg(self.serve.pid, signal.SIGTERM)
        elif way == "sigterm-all":  # vLLM's process group is in the same cgroup
            os.killpg(self.serve.pid, signal.SIGTERM)
            os.killpg(self.vllm, signal.SIGTERM)
        elif way == "sigkill-supervisor":
            self.serve.kill()
        else:
            self.serve.terminate()
        if victim is not None:
            while "stopping:" not in self.log():
                assert self.serve.poll() is None, self.log()
                time.sleep(POLL_S)
            os.kill(victim, signal.SIGKILL)
        return started

    def running(self) -> list[int]:
        """The processes of the tree, and of vLLM's process group, that have not exited
        (the supervisor, this process's child, is reaped as soon as it has)."""
        others = self.pids - {self.serve.pid} | set(procfs.group_members(self.vllm))
        return sorted([pid for pid in others if procfs.running(pid)]
                      + ([self.serve.pid] if self.serve.poll() is None else []))

    def wait_gone(self, since: float, timeout_s: float = 300) -> float:
        """Seconds from ``since`` until every process of the tree has exited (each one's
        in :attr:`gone_after`); raises if some still run after ``timeout_s``."""
        while running := self.running():
            for pid in self.pids - set(running):
                self.gone_after.setdefault(pid, time.monotonic() - since)
            if time.monotonic() - since > timeout_s:
                raise TimeoutError(f"still running {timeout_s:.0f} s after the stop: "
                                   + "; ".join(f"{pid} {procfs.command_line(pid)[:80]}" for pid in running))
            time.sleep(POLL_S)
        for pid in self.pids:
            self.gone_after.setdefault(pid, time.monotonic() - since)
        return max(self.gone_after.values())

    def end(self, grace_s: float = 120) -> None:
        """Stop whatever of the tree still runs (after a failure): SIGTERM to the supervisor,
        then SIGKILL to what is left after ``grace_s``."""
        if self.serve.poll() is None:
            self.serve.terminate()
        try:
            self.wait_gone(time.monotonic(), timeout_s=grace_s)
        except TimeoutError:
            for pid in self.running():
                os.kill(pid, signal.SIGKILL)
            self.serve.wait()
