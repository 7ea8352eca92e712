"""What a web page can make a browser send, refused by the training routes; strict body
types; bodies that arrive too slowly; retries with an Idempotency-Key that run once.

The routes run on a plain FastAPI app in front of a worker that records each call, so
the tests can hold a step back and deliver its reply late, as a slow worker would."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from livetrain.client import TrainingClient
from livetrain.routes import TrainingRoutes, router
from livetrain.routes.cross_site import CrossSitePolicy, is_loopback_host, split_host
from livetrain.routes.idempotency import IdempotencyKeys
from livetrain.routes.schemas import RequestLimits
from livetrain.worker import protocol
from livetrain.worker.protocol import WorkerError

EXAMPLE = {"context_ids": [1, 2, 3], "continuation_ids": [4, 5]}
TRAIN = json.dumps({"examples": [EXAMPLE]}).encode()
JSON = {"Content-Type": "application/json"}
EVIL = "http://evil.example"


class RecordingWorker:
    """The worker side of the routes: records calls; ``hold`` keeps the next step's reply
    back until ``release`` (then it arrives as a late reply if its caller gave up)."""

    def __init__(self) -> None:
        self.on_late_reply = None
        self.calls: list[str] = []
        self.version = 0
        self.disconnects = 0
        self.hold: asyncio.Event | None = None
        self.held: list[str] = []

    async def call(self, op, args=None, *, timeout_s=30.0, request_id=None):
        self.calls.append(op)
        if op == "status":
            return {"weights_version": self.version}
        if self.hold is not None:
            self.held.append(request_id)
            try:
                await asyncio.wait_for(asyncio.shield(self.hold.wait()), timeout_s)
            except TimeoutError:
                raise WorkerError(f"no answer within {timeout_s:g} s", protocol.TIMEOUT,
                                  code="worker_timeout") from None
        return self._step(request_id)

    def _step(self, request_id):
        self.version += 1
        return {"applied": True, "seconds": 0.01, "weights_version": self.version,
                "changed_tensors": ["model.layers.0.self_attn.q_proj.weight"], "request_id": request_id}

    def release_late(self) -> None:
        """The held step finishes after its caller's 504: its reply arrives late."""
        for request_id in self.held:
            self.on_late_reply(request_id, {"id": request_id, "ok": True, "result": self._step(request_id)})
        self.held.clear()


def routes_app(token: str | None = None, allowed_origins=(), limits: RequestLimits | None = None):
    worker = RecordingWorker()
    app = FastAPI()
    app.include_router(router)
    TrainingRoutes(worker, admin_token=token, allowed_origins=allowed_origins,
                   limits=limits or RequestLimits()).install(app.state)
    return app, worker


def loopback_client(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1:8000")


# ---- the policy, request by request ----------------------------------------------------

@pytest.mark.parametrize("authority,host,port", [
    ("127.0.0.1:8000", "127.0.0.1", "8000"), ("localhost", "localhost", None), ("[::1]:80", "::1", "80"),
    ("Evil.Example:8000", "evil.example", "8000"), ("[::1]", "::1", None)])
def test_host_headers_split_into_name_and_port(authority, host, port):
    assert split_host(authority) == (host, port)


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("app.localhost", True), ("::1", True),
    ("evil.example", False), ("localhost.evil.example", False), ("0.0.0.0", False), ("10.0.0.1", False),
    ("", False)])
def test_only_loopback_names_count_as_loopback(host, loopback):
    assert is_loopback_host(host) is loopback


TOKENLESS = CrossSitePolicy.create(token_required=False, allowed_origins=["http://localhost:3000"])
LOOPBACK = {"host": "127.0.0.1:8000", "content-type": "application/json"}


@pytest.mark.parametrize("headers,code", [
    ({**LOOPBACK, "content-type": "text/plain"}, "unsupported_media_type"),
    ({**LOOPBACK, "content-type": "application/x-www-form-urlencoded"}, "unsupported_media_type"),
    ({**LOOPBACK, "content-type": "multipart/form-data; boundary=x"}, "unsupported_media_type"),
    ({"host": "127.0.0.1:8000"}, "unsupported_media_type"),
    ({**LOOPBACK, "origin": EVIL}, "origin_not_allowed"),
    ({**LOOPBACK, "origin": "null"}, "origin_not_allowed"),
    ({**LOOPBACK, "origin": "http://127.0.0.1:9000"}, "origin_not_allowed"),  # another local server's page
    ({**LOOPBACK, "origin": "https://localhost:3000"}, "origin_not_allowed"),  # not the listed scheme
    ({**LOOPBACK, "host": "evil.example:8000"}, "host_not_allowed"),  # DNS rebinding
    ({**LOOPBACK, "host": "evil.example:8000", "origin": "http://evil.example:8000"}, "host_not_allowed"),
    ({**LOOPBACK, "host": ""}, "host_not_allowed"),
])
def test_tokenless_policy_refuses_what_a_page_can_send(headers, code):
    refusal = TOKENLESS.refusal("POST", headers)
    assert refusal is not None and refusal.code == code
    assert refusal.status == (415 if code == "unsupported_media_type" else 403)


@pytest.mark.parametrize("headers", [
    LOOPBACK, {**LOOPBACK, "content-type": "Application/JSON; charset=utf-8"},
    {**LOOPBACK, "origin": "http://127.0.0.1:8000"},  # the server's own page
    {**LOOPBACK, "origin": "http://localhost:3000"},  # listed in --allowed-origins
    {**LOOPBACK, "host": "localhost:8000"}, {**LOOPBACK, "host": "[::1]:8000"}])
def test_tokenless_policy_lets_local_json_requests_through(headers):
    assert TOKENLESS.refusal("POST", headers) is None


def test_get_needs_no_content_type_but_the_same_host_and_origin():
    assert TOKENLESS.refusal("GET", {"host": "127.0.0.1:8000"}) is None
    assert TOKENLESS.refusal("GET", {"host": "evil.example:8000"}).code == "host_not_allowed"
    assert TOKENLESS.refusal("GET", {"host": "127.0.0.1:8000", "origin": EVIL}).code == "origin_not_allowed"


def test_a_wildcard_origin_opens_the_routes_only_with_a_token():
    tokenless = CrossSitePolicy.create(False, ["*"])
    assert tokenless.refusal("POST", {**LOOPBACK, "origin": EVIL}).code == "origin_not_allowed"
    with_token = CrossSitePolicy.create(True, ["*"])
    assert with_token.refusal("POST", {**LOOPBACK, "origin": EVIL}) is None
    # With a token the Host is not checked (a proxy's name), but JSON still is.
    assert with_token.refusal("POST", {**LOOPBACK, "host": "llm.example.com"}) is None
    assert with_token.refusal("POST", {"host": "llm.example.com", "content-type": "text/plain"}).status == 415
    behind_proxy = CrossSitePolicy.create(True, [])
    assert behind_proxy.refusal("POST", {"host": "llm.example.com", "content-type": "application/json",
                                         "origin": "https://llm.example.com"}, scheme="https") is None


# ---- the routes ------------------------------------------------------------------------

ROUTES = [("POST", "/train"), ("POST", "/train/logprobs"), ("GET", "/train/status"),
          ("POST", "/checkpoint"), ("GET", "/checkpoint"), ("POST", "/rollback")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_refuses_a_foreign_origin_and_a_rebound_host(method, path):
    app, worker = routes_app()
    with loopback_client(app) as http:
        foreign = http.request(method, path, content=b"{}", headers={**JSON, "Origin": EVIL})
        rebound = http.request(method, path, content=b"{}", headers={**JSON, "Host": "evil.example:8000"})
    for response, code in ((foreign, "origin_not_allowed"), (rebound, "host_not_allowed")):
        assert response.status_code == 403, response.text
        error = response.json()["error"]
        assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    assert worker.calls == []


@pytest.mark.parametrize("path,body", [("/train", TRAIN), ("/rollback", b'{"generation": 0}'),
                                       ("/checkpoint", b""), ("/train/logprobs", json.dumps(EXAMPLE).encode())])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_bodies_that_are_not_declared_json_get_415(path, body, content_type):
    app, worker = routes_app()
    headers = {} if content_type is None else {"Content-Type": content_type}
    with loopback_client(app) as http:
        response = http.post(path, content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["error"]["message"]
    assert worker.calls == []


def test_the_token_is_checked_after_the_cross_site_checks_and_both_hold():
    app, worker = routes_app(token="t0ken", allowed_origins=["http://allowed.example"])
    with TestClient(app, base_url="http://llm.example.com") as http:
        auth = {**JSON, "Authorization": "Bearer t0ken"}
        assert http.post("/train", content=TRAIN, headers={**JSON, "Origin": "http://allowed.example"}
                         ).status_code == 401
        assert http.post("/train", content=TRAIN, headers={**auth, "Origin": EVIL}).status_code == 403
        assert http.post("/train", content=TRAIN, headers={**auth, "Content-Type": "text/plain"}).status_code == 415
        response = http.post("/train", content=TRAIN, headers={**auth, "Origin": "http://allowed.example"})
        assert response.status_code == 200 and response.json()["weights_version"] == 1
    assert worker.calls == ["train"]


@pytest.mark.parametrize("path", ["/train", "/rollback", "/checkpoint", "/train/logprobs"])
def test_deeply_nested_json_gets_a_clear_400(path):
    app, worker = routes_app()
    with loopback_client(app) as http:
        for depth in (100_000, 5_000):
            response = http.post(path, content=b"[" * depth + b"]" * depth, headers=JSON)
            assert response.status_code == 400, response.text
            assert "too deeply" in response.json()["error"]["message"]
        nested = b'{"generation": ' + b"[" * 500 + b"]" * 500 + b"}"  # parses, then fails validation
        assert http.post(path, content=nested, headers=JSON).status_code == 400
    assert worker.calls == []


@pytest.mark.parametrize("field,value", [("lr", "1e-4"), ("dry_run", "yes"), ("dry_run", 1), ("timeout_s", "5"),
                                         ("max_grad_norm", "1.0"), ("loss", 1)])
def test_values_of_the_wrong_json_type_are_refused_not_coerced(field, value):
    app, worker = routes_app()
    with loopback_client(app) as http:
        response = http.post("/train", json={"examples": [EXAMPLE], field: value})
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
        assert http.post("/rollback", json={"generation": "0"}).status_code == 400
        # An integer is a number: lr 1 and timeout_s 5 are fine.
        assert http.post("/train", json={"examples": [EXAMPLE], "lr": 1, "timeout_s": 5}).status_code == 200
    assert worker.calls == ["train"]


# ---- idempotency keys ------------------------------------------------------------------

def post_keyed(http, key, body=TRAIN, **headers):
    return http.post("/train", content=body, headers={**JSON, "Idempotency-Key": key, **headers})


def test_a_retried_key_replays_the_first_result_and_steps_once():
    app, worker = routes_app()
    with loopback_client(app) as http:
        first = post_keyed(http, "key-1")
        again = post_keyed(http, "key-1")
        other = post_keyed(http, "key-2")
    assert first.status_code == again.status_code == other.status_code == 200
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-request-id"] == first.json()["request_id"]
    assert other.json()["weights_version"] == 2
    assert worker.calls == ["train", "train"]


def test_a_step_applied_after_its_504_is_replayed_to_the_retry():
    app, worker = routes_app()
    worker.hold = asyncio.Event()
    body = json.dumps({"examples": [EXAMPLE], "timeout_s": 0.05}).encode()
    with loopback_client(app) as http:
        timed_out = post_keyed(http, "late-key", body)
        assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "worker_timeout"
        # The retry comes while the step still runs: it waits (up to timeout_s), then is told so.
        in_progress = post_keyed(http, "late-key", body)
        assert in_progress.status_code == 409
        assert in_progress.json()["error"]["code"] == "idempotent_request_in_progress"
        http.portal.call(worker.release_late)  # the step finishes: its reply arrives late
        replayed = post_keyed(http, "late-key", body)
    assert replayed.status_code == 200 and replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json()["weights_version"] == 1 and replayed.json()["tensors_changed"] == 1
    assert replayed.json()["request_id"] == timed_out.headers["x-request-id"]
    assert worker.calls == ["train"]


def test_a_key_whose_request_ran_nothing_runs_on_retry():
    app, worker = routes_app()
    step = worker.call

    async def not_running(op, args=None, **kwargs):
        worker.calls.append(op)
        raise WorkerError("the training worker is not running", protocol.UNAVAILABLE)

    with loopback_client(app) as http:
        worker.call = not_running
        assert post_keyed(http, "k").status_code == 503
        worker.call = step
        response = post_keyed(http, "k")
    assert response.status_code == 200 and "idempotent-replayed" not in response.headers
    assert worker.calls == ["train", "train"] and worker.version == 1


def test_a_request_lost_with_its_worker_runs_on_retry():
    app, worker = routes_app()
    worker.hold = asyncio.Event()
    body = json.dumps({"examples": [EXAMPLE], "timeout_s": 0.05}).encode()
    with loopback_client(app) as http:
        assert post_keyed(http, "k", body).status_code == 504
        worker.disconnects += 1  # the worker went away without answering; a new one runs
        worker.hold = None
        response = post_keyed(http, "k", body)
    assert response.status_code == 200 and "idempotent-replayed" not in response.headers
    assert worker.calls == ["train", "train"] and worker.version == 1


def test_a_key_reused_for_another_body_or_a_bad_key_is_refused():
    app, worker = routes_app()
    with loopback_client(app) as http:
        assert post_keyed(http, "k").status_code == 200
        other = json.dumps({"examples": [EXAMPLE], "lr": 1e-3}).encode()
        reused = post_keyed(http, "k", other)
        assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
        # Waiting longer is not asking for something else: a retry may raise its timeout.
        longer = json.dumps({"timeout_s": 99, "examples": [EXAMPLE]}).encode()
        assert post_keyed(http, "k", longer).headers["idempotent-replayed"] == "true"
        for bad in ("", "x" * 256, "has space", "ünïcode"):
            response = http.post("/train", content=TRAIN, headers={**JSON, "Idempotency-Key": bad.encode()})
            assert response.status_code == 400 and response.json()["error"]["code"] == "bad_idempotency_key", bad
    assert worker.calls == ["train"]


def test_keys_expire_after_their_window_and_beyond_the_bound():
    async def run():
        now = [0.0]
        keys = IdempotencyKeys(window_s=10, max_keys=2, clock=lambda: now[0])
        first, new = keys.claim("a", "f", "r1", 0)
        assert new and keys.claim("a", "f", "r2", 0) == (first, False)
        keys.claim("b", "f", "r3", 0)
        keys.claim("c", "f", "r4", 0)  # over the bound: "a", the oldest, goes
        assert keys.claim("a", "f", "r5", 0)[1] and first.outcome.cancelled()
        now[0] = 11.0
        assert keys.claim("b", "f", "r6", 0)[1]  # past the window
    asyncio.run(run())


def test_the_client_retries_a_timed_out_step_with_its_key_and_gets_it_once(caplog):
    app, worker = routes_app()
    worker.hold = asyncio.Event()
    with loopback_client(app) as http:

        def finish_held_step(request):  # before each retry: the timed-out step has finished meanwhile
            if worker.held:
                http.portal.call(worker.release_late)

        http.event_hooks["request"].append(finish_held_step)
        result = TrainingClient(http_client=http, retries=3).train([EXAMPLE], timeout_s=0.05)
    assert result["weights_version"] == 1 and worker.calls == ["train"]
    assert "sending it again" in caplog.text


# ---- bodies that arrive too slowly -----------------------------------------------------

def test_a_body_that_trickles_in_gets_408_and_other_requests_are_served_meanwhile():
    app, worker = routes_app(limits=RequestLimits(body_timeout_s=1.0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            threading.Event().wait(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"POST /train HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")  # and nothing more
            # While it hangs, another client is answered.
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as other:
                assert other.get("/train/status").status_code == 200
            reply = slow.makefile("rb").read()  # until the server closes the connection
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert b"body_timeout" in reply
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert worker.calls == ["status"]
