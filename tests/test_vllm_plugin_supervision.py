"""vLLM's process group stops when the `livetrain serve` that started it is gone: the
watchdog of `livetrain.vllm_plugin.supervision`, on stand-in processes (no vLLM).

The stand-ins: a "supervisor" starts a "vLLM" leading its own session (as the launcher
does), which starts the watchdog and a child in its group (vLLM's engine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from livetrain import procfs
from livetrain.vllm_plugin.supervision import SUPERVISOR_PID_ENV

WAIT_S = 60

# The stand-in vLLM: argv[1] "term" (default SIGTERM action) or "ignore" (deaf to SIGTERM,
# so only the watchdog's SIGKILL ends it); argv[2] "now" or "after-parent-exit" (start the
# watchdog only once the supervisor is gone, the race at plugin load).
VLLM = """
import os, signal, subprocess, sys, time
from livetrain.vllm_plugin.supervision import watch_supervisor
supervisor = int(os.environ["LIVETRAIN_SUPERVISOR_PID"])
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # inherits SIG_IGN
print(os.getpid(), engine.pid, flush=True)
while sys.argv[2] == "after-parent-exit" and os.getppid() == supervisor:
    time.sleep(0.01)
assert watch_supervisor(grace_s=1.0)
assert not watch_supervisor(grace_s=1.0)  # once per process
time.sleep(600)
"""

# The stand-in supervisor: starts the stand-in vLLM in its own session with its pid in the
# environment, passes on the pids it prints, and waits for stdin to close (or exits at once).
SUPERVISOR = """
import os, subprocess, sys
env = {**os.environ, "LIVETRAIN_SUPERVISOR_PID": str(os.getpid())}
vllm = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], env=env,
                        stdout=subprocess.PIPE, text=True, start_new_session=True)
print(os.getpid(), vllm.stdout.readline().strip(), flush=True)
if sys.argv[3] == "now":
    sys.stdin.read()
"""


def start_tree(on_sigterm: str, watch: str) -> tuple[subprocess.Popen, int, int]:
    """(the stand-in supervisor, its vLLM's pid, that vLLM's engine's pid)."""
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, VLLM, on_sigterm, watch],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _, vllm, engine = map(int, supervisor.stdout.readline().split())
    return supervisor, vllm, engine


def wait_gone(pids: list[int]) -> float:
    """Seconds until none of ``pids`` runs (fails after WAIT_S)."""
    started = time.monotonic()
    while any(procfs.running(pid) for pid in pids):
        assert time.monotonic() - started < WAIT_S, [pid for pid in pids if procfs.running(pid)]
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.parametrize("on_sigterm", ["term", "ignore"])
def test_the_vllm_group_stops_when_its_supervisor_is_killed(on_sigterm):
    supervisor, vllm, engine = start_tree(on_sigterm, "now")
    assert procfs.stat(engine)[2] == vllm  # the engine is in vLLM's group, not the supervisor's
    supervisor.kill()
    supervisor.wait()
    seconds = wait_gone([vllm, engine])
    print(f"vLLM ({on_sigterm} on SIGTERM) gone {seconds:.2f} s after its supervisor's SIGKILL")


def test_a_supervisor_gone_before_the_plugin_loads_stops_vllm_at_once():
    supervisor, vllm, engine = start_tree("term", "after-parent-exit")
    supervisor.wait()  # it exits as soon as it has printed the pids
    seconds = wait_gone([vllm, engine])
    print(f"vLLM gone {seconds:.2f} s after its supervisor exited")


def test_no_watchdog_without_a_supervisor_or_outside_the_group_leader(monkeypatch):
    from livetrain.vllm_plugin import supervision

    monkeypatch.setattr(supervision, "_watching", False)
    assert not supervision.watch_supervisor({})  # vLLM started by hand
    if os.getpid() != os.getpgrp():  # pytest is rarely a group leader; an engine process never is
        assert not supervision.watch_supervisor({SUPERVISOR_PID_ENV: str(os.getppid())})


def test_the_launcher_names_this_process_as_vllms_supervisor(tmp_path):
    from livetrain.vllm_plugin.launcher import VllmLaunch, vllm_env
    from livetrain.vllm_plugin.settings import PluginSettings

    env = vllm_env(VllmLaunch(tmp_path, PluginSettings(shm_dir=tmp_path / "livetrain-x")), base={})
    assert env[SUPERVISOR_PID_ENV] == str(os.getpid())
    assert SUPERVISOR_PID_ENV not in os.environ  # only vLLM gets it


def test_stop_vllm_waits_for_the_whole_group_and_kills_what_ignores_sigterm():
    from livetrain.vllm_plugin.launcher import stop_vllm

    # A group leader that exits on SIGTERM, and a member of its group that ignores it.
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(600)'], "
         "stdout=subprocess.PIPE)\n"
         "child.stdout.readline()\nprint(child.pid, flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    member = int(leader.stdout.readline())
    assert stop_vllm(leader, timeout_s=1.0) == -signal.SIGTERM
    wait_gone([member])
    assert not procfs.group_members(leader.pid)
