"""`livetrain serve` under failure, against a real vLLM on a tiny model: the training
worker SIGKILLed (inference goes on, training answers 503, the supervisor restarts it
with the optimizer state of its last applied step), then vLLM's engine SIGKILLed (serve exits non-zero, the
applied steps are in the directory, it verifies, nothing is left running)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from livetrain.checkpoint.commands import checkpoint_verify
from livetrain.cpus import parse_cpus
from livetrain.options import ADMIN_TOKEN_ENV, TrainerOptions
from livetrain.serve import LiveServer, ServeOptions
from livetrain.vllm_plugin.plugins import AccessRuleError
from livetrain.weights import open_shared_copy
from tests.session_helpers import example, free_port, wire

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TOKEN = "serve-failures-token"
ALLOWED_ORIGIN = "http://allowed.example"
ROUTES = [("POST", "/train"), ("POST", "/train/logprobs"), ("GET", "/train/status"),
          ("POST", "/checkpoint"), ("GET", "/checkpoint"), ("POST", "/rollback")]



def call(base: str, method: str, path: str, body: dict | None = None, token: str | None = TOKEN,
         timeout: float = 300, headers: dict[str, str] | None = None,
         content_type: str = "application/json") -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request; HTTP errors are returned, not raised."""
    headers = {"Content-Type": content_type, **(headers or {})}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if method == "GET" else json.dumps(body or {}).encode()
    request = urllib.request.Request(base + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error), dict(error.headers)


def stream_completion(base: str, model: str, out: dict) -> None:
    """A streaming completion; ``out["frames"]`` gets its frames as they arrive (the last is
    [DONE] when it ended well), ``out["error"]`` what broke it."""
    body = {"model": model, "prompt": [1, 504, 1345, 314], "max_tokens": 120, "temperature": 0,
            "ignore_eos": True, "stream": True}
    request = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    frames = out["frames"] = []  # filled as the frames arrive
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            for line in response:
                line = line.decode().strip()
                if line.startswith("data: "):
                    frames.append(line[len("data: "):])
    except Exception as exc:  # the assertion below reports it
        out["error"] = repr(exc)


def running(pids: set[int], pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes among ``pids`` or in process group ``pgid``."""
    alive = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if (process.pid in pids or os.getpgid(process.pid) == pgid) and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return alive


def train_body(i: int) -> dict:
    return {"examples": [wire(example(i))], "lr": 1e-2}


def test_refuses_a_public_address_without_an_admin_token(tmp_path, tokenizer_dir, monkeypatch):
    from tests.vllm_layouts import write_vllm_tiny_model

    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    model_dir = write_vllm_tiny_model(tmp_path / "model", "llama", tokenizer_dir)
    server = LiveServer(ServeOptions(model_dir=model_dir, host="0.0.0.0", port=free_port()), say=lambda _: None)
    with pytest.raises(AccessRuleError, match="--admin-token-file"):
        server.start()
    server.stop()
    assert server.vllm is None and not server.shm_dir.exists()


def test_worker_and_vllm_deaths(tmp_path, tokenizer_dir, monkeypatch, killed_vllm_segments_removed):
    from tests.vllm_layouts import write_vllm_tiny_model

    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    model_dir = write_vllm_tiny_model(tmp_path / "model", "llama", tokenizer_dir)
    options = ServeOptions(model_dir=model_dir, port=free_port(), trainer=TrainerOptions(lr=1e-2, max_probe_drift=0),
                           trainer_cores=1, vllm_args=("--enforce-eager", "--max-model-len", "256",
                                                       "--allowed-origins", json.dumps([ALLOWED_ORIGIN])))
    messages: list[str] = []
    server = LiveServer(options, say=messages.append)
    server.start()
    base = server.base_url
    try:
        # Auth on every route, through vLLM's own server; vLLM's limits still answer 4xx.
        for method, path in ROUTES:
            for token in (None, "wrong-token"):
                status, body, headers = call(base, method, path, token=token)
                assert status == 401 and body["error"]["type"] == "authentication_error", (path, token)
        status, body, _ = call(base, "POST", "/v1/completions",
                               {"model": str(model_dir), "prompt": "hi", "max_tokens": 10**6}, token=None)
        assert status == 400 and "error" in body

        # With a token: a page from an origin vLLM allows may train, under any Host name
        # (a proxy's); another origin may not, token or not.
        status, body, _ = call(base, "POST", "/train", train_body(0),
                               headers={"Origin": ALLOWED_ORIGIN, "Host": "llm.example.com"})
        assert status == 200 and body["applied"], body
        status, body, _ = call(base, "POST", "/train", train_body(1), headers={"Origin": "http://evil.example"})
        assert status == 403 and body["error"]["code"] == "origin_not_allowed", body
        status, body, _ = call(base, "POST", "/train", train_body(1), content_type="text/plain")
        assert status == 415, body
        status, body, _ = call(base, "POST", "/train", train_body(1))
        assert status == 200 and body["applied"], body
        # No sync since: the optimizer state and weights version of both steps live beside
        # the shared copy, so a new worker resumes from them.

        # The training worker dies while a completion streams.
        streamed: dict = {}
        streamer = threading.Thread(target=stream_completion, args=(base, str(model_dir), streamed))
        streamer.start()
        deadline = time.monotonic() + 120
        while not streamed.get("frames") and "error" not in streamed:  # a token has been generated
            assert time.monotonic() < deadline, "the completion never started streaming"
            time.sleep(0.05)
        killed_at = time.monotonic()
        server.worker.popen.send_signal(signal.SIGKILL)
        server.worker.popen.wait()
        status, body, headers = call(base, "POST", "/train", train_body(3))
        assert status == 503 and "not running" in body["error"]["message"], body
        assert "retry-after" in {k.lower() for k in headers}
        assert call(base, "GET", "/train/status")[0] == 503
        assert server.check() is None  # restarts the worker
        # On its own core (--trainer-cores 1), as the first one was; vLLM's OpenMP threads on the others.
        assert os.sched_getaffinity(server.worker.popen.pid) == server.cores.trainer_cores
        assert os.sched_getscheduler(server.worker.popen.pid) == os.SCHED_OTHER
        vllm_cores = parse_cpus(psutil.Process(server.vllm.pid).environ()["VLLM_CPU_OMP_THREADS_BIND"])
        assert vllm_cores == server.cores.vllm_cores and not vllm_cores & server.cores.trainer_cores
        status, body, _ = call(base, "POST", "/train", train_body(3))
        back_after = time.monotonic() - killed_at
        assert status == 200 and body["applied"], body
        streamer.join()
        assert "error" not in streamed and streamed["frames"][-1] == "[DONE]", streamed
        assert all("error" not in json.loads(f) for f in streamed["frames"][:-1])
        state = call(base, "GET", "/train/status")[1]
        assert state["optimizer_state"] == "restored (2 steps)", state
        assert body["weights_version"] == 3 and state["steps_applied"] == 3, state
        assert any("restarting" in m for m in messages)
        print(f"training available again {back_after:.1f} s after the worker's SIGKILL")

        # vLLM's engine dies after an applied, unsynced step.
        status, body, _ = call(base, "POST", "/train", train_body(4))
        assert status == 200 and body["applied"]
        _, served = open_shared_copy(server.shm_dir)
        qkv = served["model.layers.0.self_attn.qkv_proj.weight"].clone()
        api_server = psutil.Process(server.vllm.pid)
        engines = [p for p in api_server.children(recursive=True) if p.pid != server.worker.popen.pid]
        assert engines
        for process in engines:
            process.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 120
        while (status := server.check()) is None:
            assert time.monotonic() < deadline, "vLLM did not exit after its engine was killed"
            time.sleep(0.5)
        assert status == 1 and any("vLLM exited" in m for m in messages)
    finally:
        worker_pid = server.worker.popen.pid if server.worker else None
        vllm_pgid = server.vllm.pid if server.vllm else None
        server.stop()

    assert checkpoint_verify(model_dir)["ok"]
    from safetensors.torch import load_file

    files = load_file(model_dir / "model.safetensors")
    q_rows = files["model.layers.0.self_attn.q_proj.weight"].shape[0]
    assert torch.equal(files["model.layers.0.self_attn.q_proj.weight"], qkv[:q_rows])  # nothing applied was lost
    assert not running({worker_pid}, vllm_pgid)
    assert not server.shm_dir.exists() and not Path(server.runtime_dir).exists()
