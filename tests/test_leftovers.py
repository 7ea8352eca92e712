"""What a `livetrain serve` that did not stop cleanly left behind is found before the next
start (`livetrain.leftovers`), on stand-in processes (no vLLM)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livetrain import procfs
from livetrain.checkpoint.lock import DirectoryLock, lock_holder
from livetrain.leftovers import PortInUse, check_port_free, remove_stale_runtime_dirs, wait_for_orphaned_lock_holder
from livetrain.vllm_plugin.supervision import SUPERVISOR_PID_ENV
from livetrain.worker.process import new_runtime_dir
from tests.session_helpers import free_port

LISTEN = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
time.sleep(600)
"""


def exited_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def listen_in_own_group(port: int, supervisor: int) -> subprocess.Popen:
    """A stand-in for vLLM's API server started by the supervisor ``supervisor``."""
    process = subprocess.Popen([sys.executable, "-c", LISTEN, str(port)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, SUPERVISOR_PID_ENV: str(supervisor)}, start_new_session=True)
    assert process.stdout.readline().strip() == "listening"
    return process


def test_a_free_port_passes():
    check_port_free("127.0.0.1", free_port())


def test_a_port_held_by_any_process_names_it():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} is held by pid {os.getpid()} .*another --port"):
            check_port_free("127.0.0.1", port)


def test_a_port_held_by_a_vllm_whose_supervisor_is_gone_says_how_to_stop_it():
    port = free_port()
    orphan = listen_in_own_group(port, supervisor=exited_pid())
    try:
        with pytest.raises(PortInUse) as caught:
            check_port_free("127.0.0.1", port)
        message = str(caught.value)
        print(message)
        assert f"held by pid {orphan.pid}" in message and "that is gone" in message
        assert message.endswith(f"stop it with kill -TERM -- -{orphan.pid}")
    finally:
        orphan.kill()
        orphan.wait()


def test_a_port_held_by_a_running_servers_vllm_says_to_stop_that_server():
    port = free_port()
    running = listen_in_own_group(port, supervisor=os.getpid())  # this process is its supervisor
    try:
        with pytest.raises(PortInUse, match=f"livetrain serve that is running, pid {os.getpid()}"):
            check_port_free("127.0.0.1", port)
    finally:
        running.kill()
        running.wait()


def test_runtime_dirs_of_processes_that_are_gone_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    mine = new_runtime_dir()
    stale = tmp_path / f"livetrain-run-{exited_pid()}-abcd1234"
    stale.mkdir(mode=0o700)
    (stale / "admin-token").write_text("secret")
    other = tmp_path / "livetrain-model-0123456789abcdef"  # not a runtime directory
    other.mkdir()
    assert remove_stale_runtime_dirs() == [stale]
    assert mine.exists() and other.exists() and not stale.exists()


def test_the_lock_of_an_orphaned_holder_is_waited_for(tmp_path):
    """A training worker whose server was killed holds the lock while it syncs; the next
    server waits for it rather than failing."""
    # The holder takes the lock, is orphaned when its starter exits, and releases the lock
    # (by exiting) a moment later, as an orphaned worker does after its sync.
    holder = ("import os, sys, time\n"
              "from livetrain.checkpoint.lock import DirectoryLock\n"
              "lock = DirectoryLock(sys.argv[1], 'livetrain serve (training worker)')\n"
              "parent = os.getppid()\n"
              "print(os.getpid(), flush=True)\n"
              "while os.getppid() == parent:\n    time.sleep(0.01)\n"
              "time.sleep(1)\n")
    starter = ("import subprocess, sys\n"
               "holder = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, "
               "stderr=subprocess.DEVNULL, text=True)\n"
               "print(holder.stdout.readline().strip(), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", starter, holder, str(tmp_path)], capture_output=True, text=True,
                         check=True)
    pid = int(out.stdout)
    said: list[str] = []
    started = time.monotonic()
    wait_for_orphaned_lock_holder(tmp_path, said.append)
    print(f"waited {time.monotonic() - started:.1f} s for the orphaned holder")
    assert not procfs.running(pid)
    assert said and f"(pid {pid}), whose server is gone" in said[0]
    DirectoryLock(tmp_path, "next server").release()


def test_a_holder_whose_starter_runs_is_not_waited_for(tmp_path):
    said: list[str] = []
    with DirectoryLock(tmp_path, "livetrain serve (training worker)"):
        assert lock_holder(tmp_path)["pid"] == os.getpid()
        wait_for_orphaned_lock_holder(tmp_path, said.append, timeout_s=600)
    assert said == [] and lock_holder(tmp_path) is None


def test_the_lock_holder_is_none_when_nobody_holds_it(tmp_path):
    assert lock_holder(tmp_path) is None
    DirectoryLock(tmp_path, "a holder that has released it").release()
    assert lock_holder(tmp_path) is None
    assert not Path(tmp_path / ".livetrain" / "lock").read_text()


def test_at_start_a_synced_copy_left_behind_is_removed_and_a_held_port_refused(tmp_path, monkeypatch):
    """A shared copy its worker marked synced holds nothing the directory lacks: the next
    server removes it (an unsynced one it would serve and sync). The port check comes next."""
    from livetrain.options import ADMIN_TOKEN_ENV
    from livetrain.serve import LiveServer, ServeOptions
    from livetrain.worker.process import SYNCED_MARK

    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        said: list[str] = []
        server = LiveServer(ServeOptions(model_dir=model_dir, port=held.getsockname()[1]), say=said.append)
        server.shm_dir.mkdir(mode=0o700)
        (server.shm_dir / SYNCED_MARK).touch()
        with pytest.raises(PortInUse):
            server.start()
        assert server.stop()
    assert not server.shm_dir.exists() and not server.runtime_dir.exists()
    assert said == [f"removed {server.shm_dir}, already synced by a server on this directory that is gone"]
