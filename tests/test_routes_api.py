"""The training routes on a plain FastAPI app, against a real training worker process."""

from __future__ import annotations

import json
import time

import pytest

from livetrain.options import TrainerOptions
from livetrain.client import LivetrainError, TrainingClient
from livetrain.routes import TrainingRoutes
from livetrain.worker.process import WorkerProcess
from tests.session_helpers import CHATS, example, files_digest, routes_client, tiny_dir, wire

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = [("POST", "/train"), ("POST", "/train/logprobs"), ("GET", "/train/status"),
          ("POST", "/checkpoint"), ("GET", "/checkpoint"), ("POST", "/rollback")]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_dir):
    """(TestClient, TrainingRoutes, hook calls, model dir) with one worker for the module."""
    model_dir = tiny_dir(tmp_path_factory.mktemp("routes") / "model", tokenizer_dir)
    process = WorkerProcess.start(model_dir, TrainerOptions(sync_interval_s=3600), threads=1)
    calls: list[tuple[list[str], int]] = []

    async def on_weights_changed(names: list[str], version: int) -> None:
        calls.append((names, version))

    try:
        with routes_client(process.address, admin_token=TOKEN, on_weights_changed=on_weights_changed) as (http, routes):
            yield http, routes, calls, model_dir
    finally:
        process.stop()


def post(http, path, body):
    return http.post(path, json=body, headers=AUTH)


def logprobs_of(http, ex):
    response = post(http, "/train/logprobs", wire(ex))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN])
def test_every_route_needs_the_admin_token(served, method, path, header):
    http = served[0]
    headers = {} if header is None else {"Authorization": header}
    response = http.request(method, path, json={}, headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and "admin token" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_bodies_get_openai_shaped_400s(served):
    http = served[0]
    response = post(http, "/train", {"examples": [{"context_ids": [1, 2]}]})
    assert response.status_code == 400
    assert "continuation_ids" in response.json()["error"]["message"]
    response = post(http, "/train", {"examples": [wire(example(0))], "loss": "ppo"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "loss"
    response = http.post("/train", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_rejected_train_request_leaves_weights_unchanged(served):
    http, _, calls, model_dir = served
    ex = example(5)
    before = logprobs_of(http, ex)
    version = http.get("/train/status", headers=AUTH).json()["weights_version"]
    digest = (post(http, "/checkpoint", {}), files_digest(model_dir))[1]
    n_calls = len(calls)
    response = post(http, "/train", {"examples": [{"context_ids": [1, 2], "continuation_ids": [10**9]}]})
    assert response.status_code == 400 and "outside the vocabulary" in response.json()["error"]["message"]
    assert post(http, "/checkpoint", {}).status_code == 200
    assert files_digest(model_dir) == digest
    assert logprobs_of(http, ex)["logprobs"] == before["logprobs"]
    assert http.get("/train/status", headers=AUTH).json()["weights_version"] == version
    assert len(calls) == n_calls


def test_dry_run_changes_nothing(served):
    http, _, calls, _ = served
    ex = example(6)
    before = logprobs_of(http, ex)
    n_calls = len(calls)
    result = post(http, "/train", {"examples": [wire(ex)], "dry_run": True}).json()
    assert result["applied"] is False and result["reason"] == "dry run"
    assert -before["sum"] / before["tokens"] == pytest.approx(result["loss"], rel=1e-5)
    assert logprobs_of(http, ex)["logprobs"] == before["logprobs"]
    assert len(calls) == n_calls


def test_null_bounds_mean_no_bound_and_other_nulls_the_default():
    from livetrain.routes.schemas import TrainBody

    body = {"examples": [wire(example(0))]}
    assert TrainBody.model_validate(body).step_options() == {}
    assert TrainBody.model_validate({**body, "max_grad_norm": None, "lr": None, "orpo_lambda": None,
                                     "max_update_norm": 0.5}).step_options() == \
        {"max_grad_norm": None, "max_update_norm": 0.5}


def test_applied_step_calls_the_hook_and_changes_what_is_served(served):
    http, _, calls, _ = served
    ex = example(7)
    before = logprobs_of(http, ex)
    response = post(http, "/train", {"examples": [wire(ex)], "lr": 1e-2})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["applied"] and result["request_id"] == response.headers["x-request-id"]
    names, version = calls[-1]
    assert version == result["weights_version"] and len(names) == result["tensors_changed"] > 0
    assert logprobs_of(http, ex)["sum"] > before["sum"]


def test_a_full_queue_answers_429_with_retry_after(served):
    http, routes, _, _ = served
    routes.in_flight = routes.max_queue
    try:
        response = post(http, "/train", {"examples": [wire(example(0))]})
    finally:
        routes.in_flight = 0
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "queue_full"


def test_a_timeout_answers_504_with_the_request_id_and_nothing_runs(served):
    http, _, _, _ = served
    version = http.get("/train/status", headers=AUTH).json()["weights_version"]
    response = post(http, "/train", {"examples": [wire(example(8))], "timeout_s": 1e-6})
    assert response.status_code == 504
    request_id = response.headers["x-request-id"]
    assert request_id in response.json()["error"]["message"]
    assert http.get("/train/status", headers=AUTH).json()["weights_version"] == version


def test_checkpoint_and_rollback_restore_files_and_served_weights(served):
    http, _, calls, model_dir = served
    ex = example(9)
    first = post(http, "/checkpoint", {}).json()["generation"]
    digest, served_before = files_digest(model_dir), logprobs_of(http, ex)
    assert post(http, "/train", {"examples": [wire(ex)], "lr": 1e-2}).json()["applied"]
    assert post(http, "/checkpoint", {}).json()["generation"] > first
    generations = http.get("/checkpoint", headers=AUTH).json()["generations"]
    assert first in [g["generation"] for g in generations]
    result = post(http, "/rollback", {"generation": first}).json()
    assert result["optimizer_state"] == "reset"
    assert calls[-1][1] == result["weights_version"]
    assert files_digest(model_dir) == digest
    assert logprobs_of(http, ex)["logprobs"] == served_before["logprobs"]


def test_python_client_teaches_with_the_chat_template(served, tokenizer_dir):
    http = served[0]
    client = TrainingClient(http_client=http, admin_token=TOKEN, tokenizer=str(tokenizer_dir))
    result = client.teach("What is 2 + 2?", "You ask for a sum. 2 + 2 = 4.", dry_run=True)
    assert result["reason"] == "dry run" and result["tokens"] > 5
    assert client.status()["weights_version"] >= 0
    with pytest.raises(LivetrainError) as caught:
        TrainingClient(http_client=http).status()
    assert caught.value.status == 401 and caught.value.request_id


def test_rollback_to_an_unknown_generation_is_a_404(served):
    http = served[0]
    response = post(http, "/rollback", {"generation": 999})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["param"] == "generation" and "cannot roll back to generation 999" in error["message"]


def test_python_client_posts_a_jsonl_file_with_the_served_models_tokenizer(served, tmp_path):
    http = served[0]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for p, a in CHATS))
    client = TrainingClient(http_client=http, admin_token=TOKEN)  # tokenizer: the served model's
    summary = client.train_jsonl(data, batch_size=2, dry_run=True, progress=False)
    assert (summary.steps, summary.examples, summary.refusals) == (2, 4, {"dry run": 2})
    assert summary.tokens > 0 and summary.first_loss > 0


def test_a_step_applied_after_its_504_is_still_served(served):
    """The caller gave up while the step ran; when it lands, the hook still publishes it."""
    http, _, calls, _ = served
    batch = [wire(example(100 + i, context_len=256, continuation_len=64)) for i in range(16)]
    # A timeout a quarter of what this batch's step takes here: the worker starts it at
    # once (it is idle) and finishes it well after its caller gave up.
    seconds = post(http, "/train", {"examples": batch, "dry_run": True}).json()["seconds"]
    n_calls = len(calls)
    response = post(http, "/train", {"examples": batch, "timeout_s": seconds / 4})
    assert response.status_code == 504 and response.json()["error"]["code"] == "worker_timeout", response.text
    deadline = time.monotonic() + 120
    while len(calls) == n_calls:
        assert time.monotonic() < deadline, "the late step was never published"
        http.get("/train/status", headers=AUTH)  # lets the app's event loop run
        time.sleep(0.2)
    assert calls[-1][1] == http.get("/train/status", headers=AUTH).json()["weights_version"]


def test_an_empty_admin_token_is_refused():
    with pytest.raises(ValueError, match="admin token is empty"):
        TrainingRoutes(worker=None, admin_token=" \n")
