"""Prefix caching under training, against a real vLLM on a tiny model: a step that lands
while a request runs neither preempts that request nor lets a new request reuse blocks of
the old weights; blocks of the current weights are reused as usual."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest

from livetrain.serve import LiveServer, ServeOptions
from livetrain.vllm_plugin.cache_salt import PrefixCacheSalt, salted_body, served_salt
from tests.session_helpers import example, free_port, post_json, wire

PROMPT = list(range(300, 800))  # 500 tokens: several full KV blocks


def test_served_salt_keeps_the_clients_and_stays_within_vllms_limit():
    assert served_salt(None, 3) == "livetrain-3"
    assert served_salt("tenant-a", 3) == "tenant-a~livetrain-3"
    long = served_salt("x" * 128, 7)
    assert len(long) <= 128 and long.endswith("~livetrain-7") and long != served_salt("y" * 128, 7)
    assert served_salt("", 1) == "" and served_salt(5, 1) == 5  # left for vLLM to refuse
    assert json.loads(salted_body(b'{"prompt": "hi", "cache_salt": "a"}', 2)) == {"prompt": "hi",
                                                                                  "cache_salt": "a~livetrain-2"}
    assert salted_body(b"[1, 2]", 2) == b"[1, 2]" and salted_body(b"\xff{", 2) == b"\xff{"


def through_middleware(refreshes: int, path: str, body: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """The body and headers the app behind `PrefixCacheSalt` receives for one POST."""
    import asyncio

    seen = {}

    async def app(scope, receive, send):
        seen["headers"] = dict(scope["headers"])
        seen["body"] = (await receive())["body"]

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-length", str(len(body)).encode())]}
    asyncio.run(PrefixCacheSalt(app, lambda _: refreshes)(scope, receive, None))
    return seen["body"], seen["headers"]


def test_middleware_salts_generation_routes_after_the_first_refresh_only():
    body = b'{"prompt": "hi"}'
    assert through_middleware(0, "/v1/completions", body)[0] == body
    assert through_middleware(2, "/v1/tokenize", body)[0] == body
    salted, headers = through_middleware(2, "/v1/completions", body)
    assert json.loads(salted) == {"prompt": "hi", "cache_salt": "livetrain-2"}
    assert headers[b"content-length"] == str(len(salted)).encode()


def test_middleware_passes_bodies_python_cannot_parse_to_vllm_unchanged():
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"messages": ' + b"[" * 100_000, b"\xff{", b"[1]"):
        assert through_middleware(3, "/v1/chat/completions", body)[0] == body


def metric(base: str, name: str) -> float:
    """The sum of a Prometheus counter over its label sets."""
    with urllib.request.urlopen(base + "/metrics", timeout=60) as response:
        text = response.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def cached_prompt_tokens(base: str, model: str) -> float:
    """Prompt tokens the prefix cache served for one more request with PROMPT."""
    before = metric(base, "vllm:prefix_cache_hits_total")
    post_json(base + "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 1})
    return metric(base, "vllm:prefix_cache_hits_total") - before


class LongRequest:
    """A completion running in a thread, started a second before the constructor returns."""

    def __init__(self, base: str, body: dict) -> None:
        self.result: dict = {}
        self.preemptions_before = metric(base, "vllm:num_preemptions_total")
        self.runner = threading.Thread(target=self._run, args=(base, body))
        self.runner.start()
        time.sleep(1.0)

    def _run(self, base: str, body: dict) -> None:
        try:
            self.result = post_json(base + "/v1/completions", body)
        except Exception as exc:  # reported by the caller's assertions
            self.result = {"error": repr(exc)}


@pytest.mark.vllm
def test_a_step_during_a_request_keeps_it_running_and_new_requests_off_stale_blocks(tmp_path, tokenizer_dir):
    from tests.vllm_layouts import write_vllm_tiny_model

    model_dir = write_vllm_tiny_model(tmp_path / "model", "llama", tokenizer_dir)
    # The trainer on a core of its own: by default it runs on idle cycles only, so a step
    # could wait while the long request keeps the cores busy, and land only after it.
    server = LiveServer(ServeOptions(model_dir=model_dir, port=free_port(), lr=1e-2, max_probe_drift=0,
                                     trainer_cores=1, vllm_args=("--enforce-eager", "--max-model-len", "2048")),
                        say=lambda _: None)
    server.start()
    base, model = server.base_url, str(model_dir)
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    try:
        assert post_json(base + "/train", {"examples": [wire(example(1))]})["applied"]  # warm the worker up
        assert cached_prompt_tokens(base, model) == 0  # first time since the step: computed
        assert cached_prompt_tokens(base, model) > 0  # same weights: reused

        # A long request holds its blocks, so vLLM cannot drop the prefix cache when the step
        # lands. On a loaded machine a step can outlast it: then PROMPT is cached under the
        # new weights and the scene is set again, at most three times.
        for attempt in range(3):
            long_request = LongRequest(base, body)
            with urllib.request.urlopen(base + "/train/status", timeout=60) as response:
                pacing = json.loads(response.read())["pacing"]
            if long_request.runner.is_alive():  # it ran throughout the status call: counted
                assert pacing["generations_in_flight"] == 1, pacing
            step = post_json(base + "/train", {"examples": [wire(example(0))]})
            assert step["applied"], step
            if long_request.runner.is_alive():
                break
            long_request.runner.join()
            cached_prompt_tokens(base, model)
        else:
            pytest.fail(f"the long request ended before the step three times ({long_request.result})")

        assert cached_prompt_tokens(base, model) == 0  # the old weights' blocks are not reused
        assert cached_prompt_tokens(base, model) > 0  # the new weights' blocks are
        long_request.runner.join(timeout=300)
        assert long_request.result["usage"]["completion_tokens"] == 2000
        # It kept its KV throughout.
        assert metric(base, "vllm:num_preemptions_total") == long_request.preemptions_before
    finally:
        server.stop()
