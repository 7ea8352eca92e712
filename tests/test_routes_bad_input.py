"""Bad requests to the training routes: each gets a 4xx in OpenAI's error shape with a
message a person can act on, and none of them changes the served weights (hashed in
the shared copy the worker trains) or any byte of the model directory."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from livetrain.options import TrainerOptions
from livetrain.routes.schemas import RequestLimits
from livetrain.weights import create_shared_copy, open_shared_copy, remove_shared_copy
from livetrain.worker.process import WorkerProcess
from tests.session_helpers import example, routes_client, tiny_dir, wire
from tests.tiny_models import build_tiny_model
from tests.vllm_layouts import expected_layout

TOKEN = "bad-input-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
LIMITS = RequestLimits()
GOOD = wire(example(0))


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def many_tokens(n: int) -> dict:
    return {"context_ids": [5] * (n - 1), "continuation_ids": [6]}


# (name, path, raw body, status, words the message must hold, param if one is named)
BAD_REQUESTS = [
    ("token id outside the vocabulary", "/train",
     body(examples=[{"context_ids": [1, 2], "continuation_ids": [49152]}]), 400, "outside the vocabulary", "examples"),
    ("negative token id", "/train",
     body(examples=[{"context_ids": [1, -2], "continuation_ids": [3]}]), 400, "greater than or equal to 0", None),
    ("no examples", "/train", body(examples=[]), 400, "at least 1", "examples"),
    ("examples missing", "/train", body(loss="sft"), 400, "Field required", "examples"),
    ("empty context", "/train", body(examples=[{"context_ids": [], "continuation_ids": [3]}]), 400,
     "at least 1", "examples.0.context_ids"),
    ("empty continuation", "/train", body(examples=[{"context_ids": [1], "continuation_ids": []}]), 400,
     "continuation_ids is empty", "examples"),
    ("token ids as a string", "/train", body(examples=[{"context_ids": "hello", "continuation_ids": [3]}]), 400,
     "valid list", "examples.0.context_ids"),
    ("fractional token id", "/train", body(examples=[{"context_ids": [1.5], "continuation_ids": [3]}]), 400,
     "valid integer", None),
    ("continuation missing", "/train", body(examples=[{"context_ids": [1, 2]}]), 400, "continuation_ids", None),
    ("half a preference pair", "/train", body(examples=[{"context_ids": [1], "chosen_ids": [2]}]), 400,
     "both chosen_ids and rejected_ids", None),
    ("unknown loss", "/train", body(examples=[GOOD], loss="ppo"), 400, "'sft', 'orpo' or 'dpo'", "loss"),
    ("loss that needs preference pairs", "/train", body(examples=[GOOD], loss="dpo"), 400,
     "needs PreferenceExample", "examples"),
    ("NaN lr", "/train", b'{"examples": [{"context_ids": [1], "continuation_ids": [2]}], "lr": NaN}', 400,
     "finite number", "lr"),
    ("infinite lr", "/train", b'{"examples": [{"context_ids": [1], "continuation_ids": [2]}], "lr": Infinity}',
     400, "finite number", "lr"),
    ("negative lr", "/train", body(examples=[GOOD], lr=-1e-3), 400, "greater than 0", "lr"),
    ("lr as a string", "/train", body(examples=[GOOD], lr="fast"), 400, "valid number", "lr"),
    ("lr as a numeric string", "/train", body(examples=[GOOD], lr="1e-4"), 400, "valid number", "lr"),
    ("dry_run as a word", "/train", body(examples=[GOOD], dry_run="yes"), 400, "valid boolean", "dry_run"),
    ("JSON nested too deeply", "/train", b"[" * 100_000 + b"]" * 100_000, 400, "too deeply", None),
    ("rollback: JSON nested too deeply", "/rollback", b'{"generation": ' + b"[" * 100_000, 400, "too deeply", None),
    ("zero timeout", "/train", body(examples=[GOOD], timeout_s=0), 400, "greater than 0", "timeout_s"),
    ("unknown field", "/train", body(examples=[GOOD], learning_rate=1e-3), 400, "Extra inputs", "learning_rate"),
    ("too many examples", "/train", body(examples=[GOOD] * (LIMITS.max_examples + 1)), 400,
     f"the limit is {LIMITS.max_examples}", "examples"),
    ("too many tokens in one example", "/train", body(examples=[many_tokens(LIMITS.max_tokens_per_example + 1)]),
     400, "per example", "examples"),
    ("too many tokens in the request", "/train",
     body(examples=[many_tokens(LIMITS.max_tokens_per_example)] * (LIMITS.max_tokens_per_request
                                                                  // LIMITS.max_tokens_per_example + 1)),
     400, "per request", "examples"),
    ("longer than the model's context", "/train", body(examples=[many_tokens(2049)]), 400,
     "over the model's context length 2048", "examples"),
    ("body too large", "/train", b" " * (LIMITS.max_body_bytes + 1), 413, "larger than", None),
    ("not JSON", "/train", b"{not json", 400, "not valid JSON", None),
    ("a JSON array", "/train", b"[1, 2, 3]", 400, "valid dictionary", None),
    ("logprobs: token id outside the vocabulary", "/train/logprobs",
     body(context_ids=[1], continuation_ids=[10**9]), 400, "outside the vocabulary", "examples"),
    ("logprobs: continuation missing", "/train/logprobs", body(context_ids=[1]), 400, "Field required",
     "continuation_ids"),
    ("logprobs: too long", "/train/logprobs", body(**many_tokens(LIMITS.max_tokens_per_example + 1)), 400,
     "per example", "examples"),
    ("checkpoint: timeout as a string", "/checkpoint", body(timeout_s="soon"), 400, "valid number", "timeout_s"),
    ("checkpoint: negative timeout", "/checkpoint", body(timeout_s=-1), 400, "greater than 0", "timeout_s"),
    ("rollback: generation missing", "/rollback", body(), 400, "Field required", "generation"),
    ("rollback: generation as a string", "/rollback", body(generation="1"), 400, "valid integer", "generation"),
    ("rollback: negative generation", "/rollback", body(generation=-1), 400, "greater than or equal to 0",
     "generation"),
    ("rollback: a generation that does not exist", "/rollback", body(generation=999), 404,
     "cannot roll back to generation 999", "generation"),
]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the model directory and its .livetrain state)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def weights_digest(tensors: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_dir):
    """(TestClient, model dir, shared-copy dir, worker) on a worker training a shared copy."""
    model_dir = tiny_dir(tmp_path_factory.mktemp("bad-input") / "model", tokenizer_dir)
    shared = Path(f"/dev/shm/livetrain-test-bad-input-{os.getpid()}")
    create_shared_copy(model_dir, expected_layout(build_tiny_model("llama")), shared)
    process = WorkerProcess.start(model_dir, TrainerOptions(sync_interval_s=3600), shared_copy=shared, threads=1)
    try:
        with routes_client(process.address, admin_token=TOKEN) as (http, _):
            yield http, model_dir, shared, process
    finally:
        process.stop()
        remove_shared_copy(shared)


def test_bad_requests_get_actionable_4xx_and_change_nothing(served):
    http, model_dir, shared, _ = served
    assert http.post("/checkpoint", content=b"{}", headers=AUTH).status_code == 200  # settle the start-up sync
    _, tensors = open_shared_copy(shared)
    weights, files = weights_digest(tensors), tree_digest(model_dir)
    version = http.get("/train/status", headers=AUTH).json()["weights_version"]
    for name, path, raw, status, words, param in BAD_REQUESTS:
        response = http.post(path, content=raw, headers=AUTH)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["type"] in ("invalid_request_error", "not_found_error"), name
        assert words in error["message"], (name, error["message"])
        if param is not None:
            assert error["param"] == param, (name, error)
    assert len({path for _, path, *_ in BAD_REQUESTS}) == 4 and len(BAD_REQUESTS) >= 15
    assert weights_digest(tensors) == weights
    assert tree_digest(model_dir) == files
    assert http.get("/train/status", headers=AUTH).json()["weights_version"] == version
    # The server still trains after all that.
    result = http.post("/train", content=body(examples=[GOOD], lr=1e-2), headers=AUTH).json()
    assert result["applied"] and weights_digest(tensors) != weights


def test_side_channels_are_private(served):
    """The worker's socket is an ipc:// path in a 0700 directory; the shared weights are 0600 files."""
    _, _, shared, process = served
    assert process.address.startswith("ipc://")
    assert stat.S_IMODE(os.stat(process.runtime_dir).st_mode) == 0o700
    files = [p for p in shared.iterdir() if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert stat.S_IMODE(shared.stat().st_mode) & 0o077 == 0


def test_another_user_cannot_reach_the_worker_or_the_weights(served):
    """As uid 65534 a process can neither connect to the worker's socket nor open a weight file."""
    if os.geteuid() != 0:
        pytest.skip("switching to another user id needs root")
    _, _, shared, process = served
    socket_path = process.address[len("ipc://"):]
    weight_file = next(p for p in shared.iterdir() if p.suffix == ".bin")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the other user: report what it could do, then leave without cleanup
        outcome = []
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            import socket

            for attempt in (lambda: socket.socket(socket.AF_UNIX).connect(socket_path),
                            lambda: open(weight_file, "rb").read(1)):
                try:
                    attempt()
                    outcome.append("allowed")
                except PermissionError:
                    outcome.append("refused")
                except OSError as exc:
                    outcome.append(type(exc).__name__)
        finally:
            os.write(write, ",".join(outcome).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        outcome = pipe.read()
    os.waitpid(child, 0)
    assert outcome == "refused,refused"
    assert process.request("status")["weights_version"] >= 0  # our own user is answered


def test_refreshes_of_the_served_weights_never_overlap(tmp_path, tokenizer_dir):
    """Steps that finish close together publish one after another (vLLM's weight-update
    API refuses a second update while one is active)."""
    import asyncio

    model_dir = tiny_dir(tmp_path / "model", tokenizer_dir)
    process = WorkerProcess.start(model_dir, TrainerOptions(sync_interval_s=3600, max_probe_drift=0), threads=1)
    active, overlaps, published = [0], [0], []

    async def on_weights_changed(names: list[str], version: int) -> None:
        active[0] += 1
        overlaps[0] += active[0] > 1
        await asyncio.sleep(0.3)
        published.append(version)
        active[0] -= 1

    try:
        with routes_client(process.address, on_weights_changed=on_weights_changed) as (http, _):
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(lambda i: http.post("/train", json={"examples": [wire(example(i))]})
                                         .status_code, range(4)))
    finally:
        process.stop()
    assert statuses == [200] * 4 and overlaps[0] == 0 and sorted(published) == [1, 2, 3, 4]
