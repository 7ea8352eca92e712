"""SIGTERM to `livetrain serve` while /train is busy: it exits 0, the applied steps are
synced into the directory, the directory verifies, and nothing is left running or in
/dev/shm. A second signal exits at once; the directory still verifies."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from livetrain.checkpoint.commands import checkpoint_verify
from tests.session_helpers import example, files_digest, wire
from tests.test_serve_failures import free_port, running

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SERVE = """
import sys
from pathlib import Path
from livetrain.options import TrainerOptions
from livetrain.serve import ServeOptions, serve
sys.exit(serve(ServeOptions(model_dir=Path(sys.argv[1]), port=int(sys.argv[2]),
                            trainer=TrainerOptions(lr=1e-2, max_probe_drift=0),
                            vllm_args=("--enforce-eager", "--max-model-len", "256"))))
"""


def train_burst(base: str, results: list, stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        body = json.dumps({"examples": [wire(example(i, context_len=64, continuation_len=16))]}).encode()
        request = urllib.request.Request(base + "/train", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                results.append((response.status, json.load(response)))
        except urllib.error.HTTPError as error:
            results.append((error.code, json.load(error)))
        except OSError as exc:  # the server went away mid-request: the burst ends
            results.append((None, repr(exc)))
            return
        i += 1


def start_serve(tmp_path, tokenizer_dir) -> tuple[subprocess.Popen, str, Path, set[int]]:
    """`livetrain serve` on a tiny model in its own session: (process, base URL, model dir,
    its descendants once ready)."""
    from tests.vllm_layouts import write_vllm_tiny_model

    model_dir = write_vllm_tiny_model(tmp_path / "model", "llama", tokenizer_dir)
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    serve = subprocess.Popen([sys.executable, "-c", SERVE, str(model_dir), str(port)], stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "OpenAI API at" not in (tmp_path / "serve.log").read_text():  # both sides ready (not "vLLM ready after")
        if serve.poll() is not None or time.monotonic() > deadline:
            serve.kill()
            pytest.fail((tmp_path / "serve.log").read_text())
        time.sleep(0.5)
    return serve, f"http://127.0.0.1:{port}", model_dir, {p.pid for p in psutil.Process(serve.pid).children(recursive=True)}


def burst_until_applied(base: str, steps: int) -> tuple[threading.Thread, list, threading.Event]:
    results: list = []
    stop = threading.Event()
    burst = threading.Thread(target=train_burst, args=(base, results, stop))
    burst.start()
    while sum(1 for status, body in results if status == 200 and body["applied"]) < steps:
        assert burst.is_alive(), results
        time.sleep(0.1)
    return burst, results, stop


def shared_copy_of(model_dir) -> Path:
    from livetrain.serve import LiveServer, ServeOptions

    return LiveServer(ServeOptions(model_dir=model_dir)).shm_dir


def test_sigterm_during_training_exits_0_synced_and_clean(tmp_path, tokenizer_dir):
    serve, base, model_dir, descendants = start_serve(tmp_path, tokenizer_dir)
    original = files_digest(model_dir)  # nothing is synced before the first step
    try:
        assert shared_copy_of(model_dir).exists()
        burst, results, stop = burst_until_applied(base, 2)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=180) == 0, (tmp_path / "serve.log").read_text()
        stop.set()
        burst.join(timeout=130)
    finally:
        if serve.poll() is None:
            serve.kill()
    # Every answered /train was a result or an explicit error; none was a 5xx other than 503.
    assert all(status in (200, 503, None) for status, _ in results), results
    assert checkpoint_verify(model_dir)["ok"]
    assert files_digest(model_dir) != original  # the applied steps were synced
    assert not running(descendants | {serve.pid}, serve.pid)
    assert not shared_copy_of(model_dir).exists()


def test_a_second_signal_exits_at_once_and_leaves_the_directory_consistent(tmp_path, tokenizer_dir,
                                                                         killed_vllm_segments_removed):
    serve, base, model_dir, descendants = start_serve(tmp_path, tokenizer_dir)
    original = files_digest(model_dir)
    try:
        burst, results, stop = burst_until_applied(base, 2)
        serve.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "stopping: syncing" not in (tmp_path / "serve.log").read_text():  # the clean stop has begun
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=15) == 128 + signal.SIGTERM
        stop.set()
        burst.join(timeout=130)
    finally:
        if serve.poll() is None:
            serve.kill()
    # vLLM was killed at once; the training worker, orphaned, finishes its sync and exits.
    deadline = time.monotonic() + 120
    while running(descendants, serve.pid):
        assert time.monotonic() < deadline, running(descendants, serve.pid)
        time.sleep(0.5)
    assert checkpoint_verify(model_dir)["ok"]
    assert files_digest(model_dir) != original  # the worker kept its mapping and synced
    assert not shared_copy_of(model_dir).exists()
