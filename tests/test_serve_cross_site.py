"""What a web page can make the user's browser send to a token-less `livetrain serve`
(loopback only), against a real vLLM on a tiny model: simple cross-site requests,
forms, a foreign Origin, DNS rebinding (a foreign Host), deeply nested JSON. Each is
refused, and the served weights (hashed in the shared copy the worker trains) and the
model directory stay bit-identical; the ordinary requests still work, and a /train
retried with its Idempotency-Key steps once."""

from __future__ import annotations

import http.client
import json

import pytest

from livetrain.options import ADMIN_TOKEN_ENV, TrainerOptions
from livetrain.serve import LiveServer, ServeOptions
from livetrain.weights import open_shared_copy
from tests.session_helpers import example, files_digest, free_port, wire
from tests.test_routes_bad_input import weights_digest
from tests.vllm_layouts import write_vllm_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

EVIL = "http://evil.example"
NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_dir):
    with pytest.MonkeyPatch.context() as env:
        env.delenv(ADMIN_TOKEN_ENV, raising=False)
        model_dir = write_vllm_tiny_model(tmp_path_factory.mktemp("cross-site") / "model", "llama", tokenizer_dir)
        options = ServeOptions(model_dir=model_dir, port=free_port(),
                               trainer=TrainerOptions(lr=1e-2, max_probe_drift=0, sync_interval_s=3600),
                               vllm_args=("--enforce-eager", "--max-model-len", "256"))
        with LiveServer(options, say=lambda line: None) as live:
            yield live


def send(server: LiveServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict | str, dict[str, str]]:
    """(status, JSON or text body, headers) of one request with exactly these headers
    (``Host`` included when given: a browser's request after DNS rebinding)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.options.port, timeout=300)
    try:
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        text = response.read().decode()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return response.status, payload, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def state(server: LiveServer) -> tuple[str, str, int]:
    """(served weights, model directory files, weights version)."""
    _, tensors = open_shared_copy(server.shm_dir)
    version = send(server, "GET", "/train/status")[1]["weights_version"]
    return weights_digest(tensors), files_digest(server.model_dir), version


def train_body(i: int, **fields) -> bytes:
    return json.dumps({"examples": [wire(example(i))], **fields}).encode()


def rebound(server: LiveServer) -> str:
    return f"evil.example:{server.options.port}"


# (what a page can make a browser send: method, path, body, headers) -> the status it gets
ATTACKS = {
    "text/plain JSON from a foreign origin to /train": (
        "POST", "/train", train_body(0), {"Content-Type": "text/plain", "Origin": EVIL}, 403),
    "text/plain JSON to /train (no Origin, e.g. an old browser)": (
        "POST", "/train", train_body(0), {"Content-Type": "text/plain"}, 415),
    "text/plain rollback from a foreign origin": (
        "POST", "/rollback", b'{"generation": 0}', {"Content-Type": "text/plain", "Origin": EVIL}, 403),
    "text/plain rollback": ("POST", "/rollback", b'{"generation": 0}', {"Content-Type": "text/plain"}, 415),
    "an HTML form posting to /checkpoint": (
        "POST", "/checkpoint", b"", {"Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL}, 403),
    "a form to /checkpoint without Origin": (
        "POST", "/checkpoint", b"", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    "a body-less no-cors POST to /checkpoint": ("POST", "/checkpoint", None, {"Origin": EVIL}, 403),
    "JSON from the server's own origin but another port": (
        "POST", "/train", train_body(0), {"Content-Type": "application/json", "Origin": "http://127.0.0.1:1"}, 403),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_cross_site_requests_are_refused_and_change_nothing(server, attack):
    method, path, body, headers, expected = ATTACKS[attack]
    before = state(server)
    status, reply, _ = send(server, method, path, body, headers)
    assert status == expected, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert state(server) == before


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/train", train_body(1)), ("POST", "/train/logprobs", json.dumps(wire(example(1))).encode()),
    ("GET", "/train/status", None), ("GET", "/checkpoint", None), ("POST", "/checkpoint", b"{}"),
    ("POST", "/rollback", b'{"generation": 0}')])
def test_dns_rebinding_is_refused_on_every_route(server, method, path, body):
    before = state(server)
    headers = {"Host": rebound(server), "Origin": f"http://{rebound(server)}", "Content-Type": "application/json"}
    status, reply, _ = send(server, method, path, body, headers)
    assert status == 403 and reply["error"]["code"] == "host_not_allowed", reply
    assert state(server) == before


def test_vllm_still_guards_its_own_routes(server):
    status, reply, _ = send(server, "POST", "/v1/chat/completions", b'{"messages": []}',
                            {"Content-Type": "text/plain", "Origin": EVIL})
    assert status == 400 and "application/json" in json.dumps(reply)
    status, _, headers = send(server, "OPTIONS", "/train", None, {
        "Origin": EVIL, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert status == 400 and "access-control-allow-origin" not in headers


def test_ordinary_requests_from_this_machine_still_work(server):
    weights, _, version = state(server)
    json_headers = {"Content-Type": "application/json"}
    status, reply, _ = send(server, "POST", "/train", train_body(2), json_headers)
    assert status == 200 and reply["applied"] and reply["weights_version"] == version + 1, reply
    assert reply["refresh"]["params_reloaded"] > 0 and reply["refresh"]["prefix_cache_reset"] in ("reset", "salted")
    own_page = {**json_headers, "Origin": f"http://localhost:{server.options.port}",
                "Host": f"localhost:{server.options.port}"}
    status, reply, _ = send(server, "POST", "/train/logprobs", json.dumps(wire(example(2))).encode(), own_page)
    assert status == 200 and len(reply["logprobs"]) == len(example(2).continuation_ids)
    assert state(server)[0] != weights


def test_deeply_nested_json_is_a_400_on_training_and_generation_routes_before_and_after_a_refresh(server):
    json_headers = {"Content-Type": "application/json"}
    chat = json.dumps({"model": str(server.model_dir), "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}).encode()
    for refreshed in (False, True):
        if refreshed:  # an applied step refreshes the served weights: the cache-salt middleware is on
            assert send(server, "POST", "/train", train_body(3), json_headers)[1]["applied"]
        before = state(server)
        for path in ("/train", "/rollback", "/v1/chat/completions", "/v1/completions"):
            status, reply, _ = send(server, "POST", path, NESTED, json_headers)
            assert status == 400, (path, refreshed, reply)
        assert state(server) == before
        # The same keep-alive server still answers an ordinary request.
        assert send(server, "POST", "/v1/chat/completions", chat, json_headers)[0] == 200


def test_a_train_retried_with_its_idempotency_key_steps_once(server):
    _, _, version = state(server)
    headers = {"Content-Type": "application/json", "Idempotency-Key": "retry-e2e-1"}
    # A caller that gives up at once gets 504; the step may still run after that.
    status, first, _ = send(server, "POST", "/train", train_body(4, timeout_s=0.001), headers)
    assert status in (200, 504), first
    # Its retry (the same key and examples, a longer wait) gets the step's one result.
    status, result, _ = send(server, "POST", "/train", train_body(4, timeout_s=120), headers)
    assert status == 200 and result["applied"] and result["weights_version"] == version + 1, result
    status, again, again_headers = send(server, "POST", "/train", train_body(4, timeout_s=120), headers)
    assert status == 200 and again == result and again_headers["idempotent-replayed"] == "true"
    assert state(server)[2] == version + 1
    status, reused, _ = send(server, "POST", "/train", train_body(5), headers)
    assert status == 422 and reused["error"]["code"] == "idempotency_key_reused"
