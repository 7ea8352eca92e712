"""The training worker process and its request loop."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time

from pathlib import Path

import pytest
import zmq

from livetrain.worker import protocol
from livetrain.worker.connection import call_worker
from livetrain.worker.process import WorkerProcess
from livetrain.worker.protocol import WorkerError
from livetrain.worker.server import WorkerServer
from livetrain.worker.session import TrainingSession
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
    process = WorkerProcess.start(model_dir, threads=2, sync_interval_s=3600, idle=True, cpus=LAST_CORE)
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
                f"w = WorkerProcess.start({str(model_dir)!r}, threads=1)\n"
                f"w.request('train', {{'examples': [{wire(example(0))!r}]}})\n"
                f"print(w.popen.pid, w.runtime_dir, flush=True)\n")  # exits without stopping the worker
    out = subprocess.run([sys.executable, "-c", launcher], check=True, capture_output=True, text=True)
    pid, runtime_dir = out.stdout.split()[-2:]
    pid = int(pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, 9)
        pytest.fail("the orphaned worker did not exit")
    assert files_digest(model_dir) != digest
    with TrainingSession.open(model_dir):
        pass
    shutil.rmtree(runtime_dir)  # the launcher's, which it left behind when it exited


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
    waiting = WorkerProcess.spawn(model_dir, threads=1, wait_for_go=True)
    time.sleep(5)  # past its imports
    assert waiting.popen.poll() is None
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
