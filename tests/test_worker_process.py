"""The training worker process and its request loop."""

from __future__ import annotations

import os
import resource
import shutil
import stat
import threading
import time

from pathlib import Path

import pytest
import zmq

from livetrain.options import TrainerOptions
from livetrain.worker import protocol
from livetrain.worker.connection import call_worker
from livetrain.worker.process import WorkerProcess
from livetrain.worker.protocol import WorkerError
from livetrain.worker.server import WorkerServer
from livetrain.session import TrainingSession
from livetrain.checkpoint import DirectoryInUse
from livetrain.checkpoint.lock import DirectoryLock
from tests.session_helpers import example, files_digest, wire

LAST_CORE = {max(os.sched_getaffinity(0))}


@pytest.fixture
def loop_server(tmp_path):
    """A request loop with a slow job and a recorder, on a private ipc:// socket."""
    ran: list[str] = []
    release = threading.Event()

    def slow(args):
        release.wait(10)
        ran.append("slow")
        return {"done": True}

    def record(args):
        ran.append(args["name"])
        return {"name": args["name"]}

    handlers = {"train": slow, "logprobs": record, "shutdown": lambda args: {"closed": True}}
    server = WorkerServer(f"ipc://{tmp_path}/loop.sock", handlers)
    server.handlers["status"] = lambda args: server.load()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, ran, release
    release.set()
    call_worker(server.address, "shutdown", timeout_s=10)
    thread.join(10)
    assert not thread.is_alive()


def start_slow_job(server: WorkerServer) -> None:
    """Start the slow job and return once status reports it running."""
    threading.Thread(target=call_worker, args=(server.address, "train"), kwargs={"timeout_s": 10}).start()
    deadline = time.monotonic() + 5
    while call_worker(server.address, "status")["running"] != "train":
        assert time.monotonic() < deadline


def test_status_is_answered_while_a_job_runs(loop_server):
    server, ran, release = loop_server
    start_slow_job(server)
    assert call_worker(server.address, "status") == {"running": "train", "queued": 0}
    release.set()


def test_a_request_past_its_deadline_is_not_run(loop_server):
    server, ran, release = loop_server
    start_slow_job(server)
    with pytest.raises(WorkerError) as caught:
        call_worker(server.address, "logprobs", {"name": "late"}, timeout_s=0.2)
    assert caught.value.type == protocol.TIMEOUT
    time.sleep(0.05)  # the caller gives up at its deadline; the worker checks it just after
    release.set()
    assert call_worker(server.address, "logprobs", {"name": "next"}, timeout_s=10) == {"name": "next"}
    assert ran == ["slow", "next"]


def test_stop_answers_the_running_job_and_refuses_the_queued_ones(tmp_path):
    release = threading.Event()
    server = WorkerServer(f"ipc://{tmp_path}/loop.sock", {"train": lambda args: release.wait(10) and {"done": True}})
    server.handlers["status"] = lambda args: server.load()
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    results: dict[str, object] = {}

    def call(name: str) -> None:
        try:
            results[name] = call_worker(server.address, "train", timeout_s=10)
        except WorkerError as exc:
            results[name] = exc

    callers = [threading.Thread(target=call, args=("running",))]
    callers[0].start()
    start_deadline = time.monotonic() + 5
    while call_worker(server.address, "status")["running"] != "train":
        assert time.monotonic() < start_deadline
    callers.append(threading.Thread(target=call, args=("queued",)))
    callers[1].start()
    while call_worker(server.address, "status")["queued"] != 1:
        assert time.monotonic() < start_deadline
    server.stop()
    release.set()
    for caller in callers:
        caller.join(10)
    loop.join(10)
    assert not loop.is_alive()
    assert results["running"] == {"done": True}
    assert isinstance(results["queued"], WorkerError) and results["queued"].type == protocol.UNAVAILABLE


def test_a_bad_address_raises_in_the_caller(tmp_path):
    server = WorkerServer(f"ipc://{tmp_path}/missing/dir/loop.sock", {})
    with pytest.raises(zmq.ZMQError):
        server.serve_forever()


def test_unknown_operations_and_bad_frames_get_errors(loop_server):
    server = loop_server[0]
    with pytest.raises(WorkerError, match="unknown operation") as caught:
        call_worker(server.address, "rollback", timeout_s=5)  # a known op this server lacks
    assert caught.value.type == protocol.INVALID_REQUEST


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tokenizer_dir):
    from tests.session_helpers import tiny_dir

    model_dir = tiny_dir(tmp_path_factory.mktemp("worker") / "model", tokenizer_dir)
    process = WorkerProcess.start(model_dir, TrainerOptions(sync_interval_s=3600), threads=2, idle=True,
                                  cpus=LAST_CORE)
    yield process, model_dir
    process.stop()


def test_every_thread_of_the_worker_runs_on_idle_cycles_of_its_cores(worker):
    process, _ = worker
    process.request("train", {"examples": [wire(example(0))]})  # every thread pool has started
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # not inherited from this process
    tasks = list(Path(f"/proc/{process.popen.pid}/task").iterdir())
    assert len(tasks) > 2
    assert {os.sched_getscheduler(int(task.name)) for task in tasks} == {os.SCHED_IDLE}
    assert all(os.sched_getaffinity(int(task.name)) == LAST_CORE for task in tasks)


def test_the_socket_lives_in_a_private_runtime_directory(worker):
    process, _ = worker
    assert stat.S_IMODE(process.runtime_dir.stat().st_mode) == 0o700
    assert process.address == f"ipc://{process.runtime_dir}/worker.sock"


def test_the_worker_holds_the_directory_lock(worker):
    _, model_dir = worker
    with pytest.raises(DirectoryInUse, match="livetrain serve"):
        TrainingSession.open(model_dir)


def test_train_reports_changed_tensors_and_weights_version(worker):
    process, _ = worker
    version = process.request("status")["weights_version"]
    result = process.request("train", {"examples": [wire(example(0))]})
    assert result["applied"] and result["weights_version"] == version + 1
    assert result["changed_tensors"] and all(n.endswith("_proj.weight") for n in result["changed_tensors"])
    status = process.request("status")
    assert status["dirty_since_sync"] and status["recent"][-1]["weights_version"] == version + 1


def test_bad_examples_are_invalid_requests_naming_the_field(worker):
    process, _ = worker
    with pytest.raises(WorkerError) as caught:
        process.request("train", {"examples": [{"context_ids": [1, 2], "continuation_ids": "abc"}]})
    assert caught.value.type == protocol.INVALID_REQUEST and caught.value.param == "examples[0].continuation_ids"
    with pytest.raises(WorkerError, match="outside the vocabulary") as caught:
        process.request("train", {"examples": [{"context_ids": [1], "continuation_ids": [10**9]}]})
    assert caught.value.type == protocol.INVALID_REQUEST


def test_shutdown_syncs_and_releases_the_directory(tmp_path, tokenizer_dir):
    from tests.session_helpers import tiny_dir

    model_dir = tiny_dir(tmp_path / "model", tokenizer_dir)
    digest = files_digest(model_dir)
    process = WorkerProcess.start(model_dir, threads=1)
    process.request("train", {"examples": [wire(example(0))]})
    assert process.stop() == 0
    assert files_digest(model_dir) != digest
    assert not process.runtime_dir.exists()
    with TrainingSession.open(model_dir) as session:
        assert session.optimizer_state == "restored (1 steps)"


def test_sigterm_finishes_syncs_and_exits_cleanly(tmp_path, tokenizer_dir):
    from tests.session_helpers import tiny_dir

    model_dir = tiny_dir(tmp_path / "model", tokenizer_dir)
    digest = files_digest(model_dir)
    process = WorkerProcess.start(model_dir, threads=1)
    process.request("train", {"examples": [wire(example(0))]})
    process.popen.terminate()
    assert process.popen.wait(timeout=60) == 0
    process.stop()
    assert files_digest(model_dir) != digest


def test_an_orphaned_worker_syncs_and_exits(tmp_path, tokenizer_dir):
    """The launcher dies without stopping the worker: it syncs, unlocks and exits by itself."""
    import subprocess
    import sys

    from tests.session_helpers import tiny_dir

    model_dir = tiny_dir(tmp_path / "model", tokenizer_dir)
    digest = files_digest(model_dir)
    launcher = (f"import json, sys\n"
                f"from livetrain.worker.process import WorkerProcess\n"
                f"w = WorkerProcess.start({str(model_dir)!r}, threads=1, log_path={str(tmp_path / 'worker.log')!r})\n"
                f"w.request('train', {{'examples': [{wire(example(0))!r}]}})\n"
                f"print(w.popen.pid, w.runtime_dir, flush=True)\n")  # exits without stopping the worker
    out = subprocess.run([sys.executable, "-c", launcher], check=True, capture_output=True, text=True)
    pid, runtime_dir = out.stdout.split()[-2:]
    wait_until_gone(int(pid))
    assert files_digest(model_dir) != digest
    with TrainingSession.open(model_dir):
        pass
    assert not Path(runtime_dir).exists()  # nobody else would remove it: the worker did


@pytest.fixture
def served_copy(tiny_model_dir):
    """A tiny bf16 model directory and a shared copy of its weights in vLLM's layout (as
    `livetrain serve` has them), removed afterwards if still there."""
    import torch

    from livetrain.weights import create_shared_copy
    from tests.tiny_models import build_tiny_model
    from tests.vllm_layouts import expected_layout

    model_dir = tiny_model_dir("llama", dtype=torch.bfloat16)
    shared = Path(f"/dev/shm/livetrain-test-worker-{os.getpid()}")
    create_shared_copy(model_dir, expected_layout(build_tiny_model("llama").to(torch.bfloat16)), shared)
    yield model_dir, shared
    shutil.rmtree(shared, ignore_errors=True)


def test_an_orphaned_worker_on_a_shared_copy_syncs_it_then_removes_it(served_copy, tmp_path):
    """The supervisor of `livetrain serve` is SIGKILLed: its worker syncs the served weights,
    and removes them and its runtime directory, since nobody else will."""
    import subprocess
    import sys

    from livetrain.checkpoint.commands import checkpoint_verify

    model_dir, shared = served_copy
    digest = files_digest(model_dir)
    launcher = (f"import os, signal\n"
                f"from livetrain.options import TrainerOptions\n"
                f"from livetrain.worker.process import WorkerProcess\n"
                f"w = WorkerProcess.start({str(model_dir)!r}, TrainerOptions(lr=1e-2), threads=1,\n"
                f"                        shared_copy={str(shared)!r}, log_path={str(tmp_path / 'worker.log')!r})\n"
                f"assert w.request('train', {{'examples': [{wire(example(0))!r}]}})['applied']\n"
                f"print(w.popen.pid, w.runtime_dir, flush=True)\n"
                f"os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True)
    pid, runtime_dir = out.stdout.split()[-2:]
    wait_until_gone(int(pid))
    assert files_digest(model_dir) != digest and checkpoint_verify(model_dir)["ok"]
    assert not shared.exists() and not Path(runtime_dir).exists()


def test_the_worker_marks_its_synced_copy_and_cleans_up_when_its_starter_leaves_first(served_copy):
    """`livetrain serve` exits at a second signal without waiting for the worker: whichever
    of the two finishes last removes the shared copy, once it is synced."""
    from livetrain.worker.process import ABANDONED_MARK, SYNCED_MARK

    model_dir, shared = served_copy
    worker = WorkerProcess.start(model_dir, TrainerOptions(lr=1e-2), shared_copy=shared, threads=1)
    assert worker.request("train", {"examples": [wire(example(0))]})["applied"]
    assert not (shared / SYNCED_MARK).exists()
    assert worker.stop() == 0
    assert (shared / SYNCED_MARK).exists()  # synced: its starter may remove it

    worker = WorkerProcess.start(model_dir, TrainerOptions(lr=1e-2), shared_copy=shared, threads=1)
    assert not (shared / SYNCED_MARK).exists()  # a new worker may apply steps to it
    assert worker.request("train", {"examples": [wire(example(1))]})["applied"]
    (worker.runtime_dir / ABANDONED_MARK).touch()  # its starter leaves without cleaning up
    assert worker.stop() == 0
    assert not shared.exists()  # synced, then removed by the worker


def wait_until_gone(pid: int) -> None:
    """Wait (up to a minute) until ``pid`` has exited; print how long it took."""
    from livetrain import procfs

    started = time.monotonic()
    while procfs.running(pid):
        if time.monotonic() - started > 60:
            os.kill(pid, 9)
            pytest.fail("the orphaned worker did not exit")
        time.sleep(0.05)
    print(f"the orphaned worker exited {time.monotonic() - started:.1f} s after its launcher")


# A stand-in worker: takes one request on the address argv[1] and exits without answering it,
# as a worker that got its parent's signal too closes its socket, syncs and exits.
TAKES_ONE_REQUEST_AND_EXITS = ("import sys, zmq\n"
                               "socket = zmq.Context().socket(zmq.ROUTER)\n"
                               "socket.bind(sys.argv[1])\n"
                               "socket.recv_multipart()\n")


def test_a_request_to_a_worker_that_exits_without_answering_fails_at_once(tmp_path):
    import subprocess
    import sys

    address = f"ipc://{tmp_path}/gone.sock"
    process = subprocess.Popen([sys.executable, "-c", TAKES_ONE_REQUEST_AND_EXITS, address])
    started = time.monotonic()
    with pytest.raises(WorkerError) as caught:
        call_worker(address, "status", timeout_s=600, alive=lambda: process.poll() is None)
    print(f"noticed {time.monotonic() - started:.2f} s after the request was sent")
    assert caught.value.type == protocol.UNAVAILABLE and caught.value.code == "worker_stopped"
    assert process.returncode == 0  # reaped by the liveness check


def test_stop_notices_a_worker_that_exits_without_answering_its_shutdown_request(caplog):
    """What `livetrain serve` met when the worker got the group's SIGTERM too: no wait for
    an answer that cannot come, no SIGTERM, the exit status of a clean exit."""
    import subprocess
    import sys

    from livetrain.worker.process import new_runtime_dir, worker_address

    runtime_dir = new_runtime_dir()
    popen = subprocess.Popen([sys.executable, "-c", TAKES_ONE_REQUEST_AND_EXITS, worker_address(runtime_dir)])
    worker = WorkerProcess(popen, runtime_dir, owns_runtime_dir=True)
    started = time.monotonic()
    assert worker.stop(timeout_s=600) == 0
    print(f"stop() returned {time.monotonic() - started:.2f} s after the shutdown request was sent")
    assert "terminating" not in caplog.text and not runtime_dir.exists()


def test_stop_reaps_a_worker_that_stopped_by_itself(tmp_path, tokenizer_dir, caplog):
    """SIGTERM to the whole process group (Ctrl-C, systemd's default): the worker syncs and
    exits by itself, and is a zombie when its parent asks it to shut down."""
    from tests.session_helpers import tiny_dir

    model_dir = tiny_dir(tmp_path / "model", tokenizer_dir)
    digest = files_digest(model_dir)
    process = WorkerProcess.start(model_dir, threads=1)
    process.request("train", {"examples": [wire(example(0))]})
    process.popen.terminate()
    os.waitid(os.P_PID, process.popen.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    assert process.stop(timeout_s=600) == 0
    assert "terminating" not in caplog.text
    assert files_digest(model_dir) != digest and not process.runtime_dir.exists()


def test_a_garbage_reply_frame_does_not_stop_the_connection(tmp_path):
    import asyncio

    from livetrain.worker.connection import WorkerConnection

    address = f"ipc://{tmp_path}/fake.sock"
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(address)

    def answer_after_garbage() -> None:
        envelope_and_payload = router.recv_multipart()
        envelope, payload = envelope_and_payload[:-1], envelope_and_payload[-1]
        router.send_multipart([*envelope, b"\xff not json"])
        reply = protocol.ok_reply(protocol.decode(payload)["id"], {"running": None})
        router.send_multipart([*envelope, protocol.encode(reply)])

    fake = threading.Thread(target=answer_after_garbage, daemon=True)
    fake.start()

    async def ask() -> dict:
        connection = WorkerConnection(address)
        try:
            return await connection.call("status", timeout_s=10)
        finally:
            connection.close()

    try:
        assert asyncio.run(ask()) == {"running": None}
    finally:
        fake.join(10)
        router.close(linger=0)
        context.term()


def test_worker_waiting_for_go_opens_nothing_until_told_and_exits_cleanly_if_never(tmp_path, tokenizer_dir):
    from tests.session_helpers import tiny_dir

    model_dir = tiny_dir(tmp_path / "model", tokenizer_dir)
    log = tmp_path / "worker.log"
    waiting = WorkerProcess.spawn(model_dir, threads=1, wait_for_go=True, log_path=log)
    deadline = time.monotonic() + 120
    while "waiting for the go" not in log.read_text():  # its imports are done
        assert waiting.popen.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    DirectoryLock(model_dir, "test").release()  # it has not opened the directory
    with pytest.raises(WorkerError):
        waiting.request("status", timeout_s=1.0)  # not listening yet
    assert waiting.stop(timeout_s=30) == 0  # the end of its input: exits, nothing to sync
    assert not waiting.runtime_dir.exists()

    told = WorkerProcess.spawn(model_dir, threads=1, wait_for_go=True)
    told.go()
    assert told.wait_ready(120)["steps_applied"] == 0
    assert told.request("train", {"examples": [wire(example(0))]})["applied"]
    assert told.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0 and resource.getrlimit(resource.RLIMIT_NICE)[0] < 20,
                    reason="leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE >= 20")
def test_the_final_sync_leaves_idle_scheduling():
    """A worker under SCHED_IDLE syncs at normal priority when it stops (whoever stops it waits)."""
    import subprocess
    import sys

    check = ("import os, threading\n"
             "from livetrain.cpus import schedule_normally, schedule_when_idle\n"
             "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
             "schedule_when_idle()\n"
             "threads = [int(t) for t in os.listdir('/proc/self/task')]\n"
             "assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_IDLE}\n"
             "schedule_normally()\n"
             "assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_OTHER}\n")
    subprocess.run([sys.executable, "-c", check], check=True)
