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

from livetrain.options import TrainerOptions
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


def cached_prompt_tokens(base: str, model: str) -> int:
    """Prompt tokens the prefix cache served for one more request with PROMPT (from the
    response's own usage)."""
    reply = post_json(base + "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 1})
    return (reply["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def generations_in_flight(base: str) -> int:
    with urllib.request.urlopen(base + "/train/status", timeout=60) as response:
        return json.loads(response.read())["pacing"]["generations_in_flight"]


class StreamedRequest:
    """A streaming completion in a thread; ``started`` is set once its first token arrived
    (it is then inside vLLM, holding its KV blocks)."""

    def __init__(self, base: str, body: dict) -> None:
        self.started, self.frames, self.error = threading.Event(), [], None
        self.runner = threading.Thread(target=self._run, args=(base, {**body, "stream": True}))
        self.runner.start()

    def _run(self, base: str, body: dict) -> None:
        request = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                for line in response:
                    if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                        self.frames.append(json.loads(line[len(b"data: "):]))
                        self.started.set()
        except Exception as exc:  # reported by the caller's assertions
            self.error = repr(exc)
        finally:
            self.started.set()

    def finished(self) -> bool:
        return any(frame.get("usage") or any(c.get("finish_reason") for c in frame["choices"])
                   for frame in self.frames)

    def tokens(self) -> int | None:
        """Tokens generated, from the final usage frame (a frame may carry several tokens
        when the API server falls behind); None before it arrived."""
        usage = [frame["usage"] for frame in self.frames if frame.get("usage")]
        return usage[-1]["completion_tokens"] if usage else None


@pytest.mark.vllm
def test_a_step_during_a_request_keeps_it_running_and_new_requests_off_stale_blocks(tmp_path, tokenizer_dir):
    from tests.vllm_layouts import write_vllm_tiny_model

    model_dir = write_vllm_tiny_model(tmp_path / "model", "llama", tokenizer_dir)
    # The trainer on a core of its own: by default it runs on idle cycles only, so a step
    # could wait while the long request keeps the cores busy, and land only after it.
    server = LiveServer(ServeOptions(model_dir=model_dir, port=free_port(), trainer=TrainerOptions(lr=1e-2, max_probe_drift=0),
                                     trainer_cores=1, vllm_args=("--enforce-eager", "--max-model-len", "2048",
                                                                 "--enable-prompt-tokens-details")),
                        say=lambda _: None)
    server.start()
    base, model = server.base_url, str(model_dir)
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    try:
        assert post_json(base + "/train", {"examples": [wire(example(1))]})["applied"]  # warm the worker up
        assert cached_prompt_tokens(base, model) == 0  # first time since the step: computed
        assert cached_prompt_tokens(base, model) > 0  # same weights: reused
        preemptions = metric(base, "vllm:num_preemptions_total")

        # A step that lands while a request holds its blocks: vLLM refuses to drop the prefix
        # cache ("salted"). On a loaded machine the request can end before the step lands
        # (then the cache is simply reset): the scene is set again, at most three times.
        for attempt in range(3):
            long_request = StreamedRequest(base, body)
            assert long_request.started.wait(timeout=300) and long_request.error is None, long_request.error
            deadline = time.monotonic() + 60
            while generations_in_flight(base) != 1 and not long_request.finished():
                assert time.monotonic() < deadline, "the streaming request was never counted as in flight"
                time.sleep(0.05)
            step = post_json(base + "/train", {"examples": [wire(example(0))]})
            assert step["applied"], step
            if step["refresh"]["prefix_cache_reset"] == "salted":
                break
            long_request.runner.join()
            cached_prompt_tokens(base, model)
        else:
            pytest.fail("the long request ended before the step landed, three times")

        assert cached_prompt_tokens(base, model) == 0  # the old weights' blocks are not reused
        assert cached_prompt_tokens(base, model) > 0  # the new weights' blocks are
        long_request.runner.join(timeout=600)
        assert long_request.error is None and long_request.tokens() == 2000, long_request.error
        # It kept its KV throughout.
        assert metric(base, "vllm:num_preemptions_total") == preemptions
    finally:
        server.stop()
