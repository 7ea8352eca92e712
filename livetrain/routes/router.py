"""The training HTTP surface: a FastAPI router that forwards to the training worker.

Mounted by the vLLM endpoint plugin (or any FastAPI app, as in the tests). Its
dependencies live on the app's state as a :class:`TrainingRoutes` (installed with
:meth:`TrainingRoutes.install`), since vLLM mounts routers before it hands out the
engine client that the weights-changed hook needs.

Routes (all need ``Authorization: Bearer TOKEN`` when a token is set):
``POST /train``, ``POST /train/logprobs``, ``GET /train/status``, ``POST /checkpoint``,
``GET /checkpoint``, ``POST /rollback``. Errors use OpenAI's error shape.

Every request passes, in order: the cross-site checks (`livetrain.routes.cross_site`),
the admin token, the body (JSON, within its size and time limits, strictly typed), then
for a ``POST`` with an ``Idempotency-Key`` the replay of an earlier outcome
(`livetrain.routes.idempotency`), and only then the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import math
from collections.abc import Sequence
from typing import Any, Awaitable, Callable, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from livetrain.routes import idempotency
from livetrain.routes.cross_site import CrossSitePolicy
from livetrain.routes.idempotency import IdempotencyKeys, Outcome
from livetrain.routes.pacing import StepPacer, TurnTimeout
from livetrain.routes.schemas import (CheckpointBody, LogprobsBody, RequestLimits, RollbackBody, TrainBody,
                                      error_response, validation_error_response)
from livetrain.worker import protocol
from livetrain.worker.protocol import WorkerError

log = logging.getLogger(__name__)
STATE_ATTRIBUTE = "livetrain_training"
STATUS_TIMEOUT_S = 10.0

# Called after the served weights changed (an applied step, a rollback) with the Hugging
# Face names of the changed tensors and the new weights version; returns once vLLM
# serves them (kernels refreshed, prefix cache reset), with what the refresh did (the
# response's "refresh").
WeightsChangedHook = Callable[[list[str], int], Awaitable[dict[str, Any]]]


class Worker(Protocol):
    # Called with (request id, reply) for a request whose caller had already timed out.
    on_late_reply: Callable[[str, dict[str, Any]], None] | None

    @property
    def disconnects(self) -> int: ...

    async def call(self, op: str, args: dict[str, Any] | None = None, *, timeout_s: float = 30.0,
                   request_id: str | None = None) -> dict[str, Any]: ...


@dataclasses.dataclass
class TrainingRoutes:
    """What the routes need: the worker, the admin token, the hook, the limits.

    ``max_queue``: requests for the worker (train, logprobs, checkpoint, rollback)
    waiting or running at once; one more gets 429 with ``Retry-After``. ``limits``:
    body size and arrival time, examples and tokens per request. ``pacer``: paces
    training steps while generation requests are in flight (the default never pauses).
    ``allowed_origins``: vLLM's ``--allowed-origins`` (see `cross_site`).
    ``idempotency``: the outcomes of recent ``Idempotency-Key`` requests.
    """

    worker: Worker
    admin_token: str | None = None
    on_weights_changed: WeightsChangedHook | None = None
    max_queue: int = 8
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)
    pacer: StepPacer = dataclasses.field(default_factory=StepPacer)
    allowed_origins: Sequence[str] = ()
    idempotency: IdempotencyKeys = dataclasses.field(default_factory=IdempotencyKeys)
    # One refresh of the served weights at a time: vLLM's weight-update API refuses a
    # second start_weight_update while one is active (steps finishing close together).
    refresh_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    in_flight: int = 0
    last_step_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("the admin token is empty; give a non-empty token, or none")
        self.cross_site = CrossSitePolicy.create(self.admin_token is not None, self.allowed_origins)

    def install(self, state: Any) -> None:
        """Make these the routes' dependencies (``state``: the FastAPI app's ``state``)."""
        setattr(state, STATE_ATTRIBUTE, self)
        self.worker.on_late_reply = self._late_reply

    def _late_reply(self, request_id: str, reply: dict[str, Any]) -> None:
        """A request that finished after its caller got a 504: a step (or rollback) is
        served too, and its outcome is kept for a retry with the same idempotency key."""
        if not reply.get("ok"):
            self.idempotency.settle_request(request_id, None)
            return
        task = asyncio.get_running_loop().create_task(_settle_late(self, reply["result"], request_id))
        task.add_done_callback(_log_failure)


router = APIRouter(tags=["livetrain"])


class _Refused(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def _routes(request: Request) -> TrainingRoutes:
    routes = getattr(request.app.state, STATE_ATTRIBUTE, None)
    if routes is None:
        raise _Refused(error_response(503, "the training worker is not attached to this server yet",
                                      protocol.UNAVAILABLE))
    refusal = routes.cross_site.refusal(request.method, request.headers, request.url.scheme)
    if refusal is not None:
        raise _Refused(error_response(refusal.status, refusal.message, "invalid_request_error",
                                      code=refusal.code))
    if routes.admin_token is not None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  routes.admin_token.encode()):
            raise _Refused(error_response(
                401, "this route needs the admin token: send 'Authorization: Bearer TOKEN'",
                "authentication_error", code="invalid_admin_token",
                headers={"WWW-Authenticate": "Bearer"}))
    return routes


async def _raw_body(request: Request, limits: RequestLimits) -> bytes:
    """The request's body, refused when larger than ``max_body_bytes`` or slower to arrive
    than ``body_timeout_s`` (a client trickling its body would hold its request forever)."""
    limit = limits.max_body_bytes
    too_large = error_response(413, f"the request body is larger than {limit} bytes; send fewer or shorter "
                                    "examples per request", "invalid_request_error", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _Refused(too_large)
    raw = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise _Refused(too_large)
    except TimeoutError:
        raise _Refused(error_response(
            408, f"the request body did not arrive within {limits.body_timeout_s:g} s; send it in one go",
            "invalid_request_error", code="body_timeout", headers={"Connection": "close"})) from None
    except ClientDisconnect:
        raise _Refused(error_response(400, "the client went away before sending its whole body",
                                      "invalid_request_error", code="client_disconnected")) from None
    return bytes(raw)


def _parse(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """``raw`` as ``model`` (an empty body is ``{}``); refusals are 400s that say what is wrong."""
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        raise _Refused(error_response(400, "the request body is not valid JSON", "invalid_request_error"))
    except RecursionError:
        raise _Refused(error_response(400, "the request body nests JSON arrays or objects too deeply to parse",
                                      "invalid_request_error", code="json_too_deep"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _Refused(validation_error_response(exc))


def _check_limits(routes: TrainingRoutes, examples: list[list[list[int]]]) -> None:
    reason = routes.limits.check(examples)
    if reason is not None:
        raise _Refused(error_response(400, reason, "invalid_request_error", param="examples",
                                      code="request_too_large"))


def _worker_error(exc: WorkerError, request_id: str) -> JSONResponse:
    status = protocol.HTTP_STATUS.get(exc.type, 500)
    headers = {"X-Request-Id": request_id}
    if status == 503:
        headers["Retry-After"] = "5"
    return error_response(status, exc.message, exc.type, exc.param, exc.code, headers=headers)


async def _queued_call(routes: TrainingRoutes, op: str, args: dict[str, Any], timeout_s: float,
                       request_id: str, paced: bool = False) -> dict[str, Any]:
    """A worker call that holds a place in the bounded queue while it waits and runs
    (``paced``: a training step, which also waits for its turn with the pacer)."""
    if routes.in_flight >= routes.max_queue:
        retry_after = max(1, math.ceil(routes.last_step_seconds * routes.in_flight))
        raise _Refused(error_response(
            429, f"the training queue is full ({routes.in_flight} requests); retry in {retry_after} s",
            "rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after)}))
    routes.in_flight += 1
    try:
        async with routes.pacer.turn(timeout_s) if paced else contextlib.nullcontext(0.0) as waited_s:
            return await routes.worker.call(op, args, timeout_s=timeout_s - waited_s, request_id=request_id)
    except TurnTimeout:  # nothing was sent to the worker
        raise _Refused(error_response(
            504, f"training is paced while generation requests are in flight, and this step's turn did "
                 f"not come within its timeout_s ({timeout_s:g} s); it did not run",
            protocol.TIMEOUT, code="paced_timeout", headers={"X-Request-Id": request_id}))
    except WorkerError as exc:
        raise _Refused(_worker_error(exc, request_id))
    finally:
        routes.in_flight -= 1


async def _publish(routes: TrainingRoutes, result: dict[str, Any], request_id: str) -> None:
    """Tell the serving side which tensors changed; the response waits until it serves them."""
    changed = result.pop("changed_tensors", [])
    result["tensors_changed"] = len(changed)
    if not changed or routes.on_weights_changed is None:
        return
    try:
        async with routes.refresh_lock:
            result["refresh"] = await routes.on_weights_changed(changed, result["weights_version"])
    except Exception as exc:
        log.exception("refreshing the served weights failed after request %s", request_id)
        raise _Refused(error_response(
            500, f"the weights changed (weights_version {result['weights_version']}) but the served "
                 f"model could not be refreshed ({type(exc).__name__}: {exc}); it may serve the "
                 "previous weights until the next successful refresh",
            protocol.INTERNAL, code="refresh_failed", headers={"X-Request-Id": request_id}))


async def _settle_late(routes: TrainingRoutes, result: dict[str, Any], request_id: str) -> None:
    """Serve a late result's weights, and keep its outcome for retries of its key."""
    try:
        await _publish(routes, result, request_id)
        outcome = Outcome(200, {**result, "request_id": request_id}, {"X-Request-Id": request_id})
    except _Refused as refused:
        outcome = _outcome(refused.response)
    routes.idempotency.settle_request(request_id, outcome)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("publishing a late step failed: %s", task.exception())


Endpoint = Callable[[TrainingRoutes, Any, str], Awaitable[dict[str, Any]]]


def _handled(endpoint: Endpoint, body_model: type[BaseModel] | None = None
             ) -> Callable[[Request], Awaitable[JSONResponse]]:
    """The route for ``endpoint(routes, body, request_id)``: checks, the body parsed as
    ``body_model`` (None: no body), a request id, and idempotency-key replays; a
    refusal becomes its OpenAI-shaped error."""

    async def run(request: Request) -> JSONResponse:
        request_id = protocol.new_request_id()
        try:
            routes = _routes(request)
            body = None if body_model is None else _parse(await _raw_body(request, routes.limits), body_model)
            respond = functools.partial(_respond, endpoint, routes, body, request_id)
            key = request.headers.get(idempotency.HEADER)
            if key is None or request.method != "POST":
                return await respond()
            fields = {} if body is None else body.model_dump(mode="json")
            return await _once(routes, key, idempotency.fingerprint(request.method, request.url.path, fields),
                               request_id, getattr(body, "timeout_s", STATUS_TIMEOUT_S), respond)
        except _Refused as refused:
            refused.response.headers.setdefault("X-Request-Id", request_id)
            return refused.response

    run.__name__ = endpoint.__name__
    run.__doc__ = endpoint.__doc__
    return run


async def _respond(endpoint: Endpoint, routes: TrainingRoutes, body: Any, request_id: str) -> JSONResponse:
    try:
        result = await endpoint(routes, body, request_id)
    except _Refused as refused:
        refused.response.headers.setdefault("X-Request-Id", request_id)
        return refused.response
    return JSONResponse({**result, "request_id": request_id}, headers={"X-Request-Id": request_id})


async def _once(routes: TrainingRoutes, key: str, fingerprint: str, request_id: str, timeout_s: float,
                respond: Callable[[], Awaitable[JSONResponse]]) -> JSONResponse:
    """``respond()`` for the first request with ``key``; the same outcome for its retries."""
    try:
        idempotency.check_key(key)
    except idempotency.BadKey as exc:
        raise _Refused(error_response(400, str(exc), "invalid_request_error", param=idempotency.HEADER,
                                      code="bad_idempotency_key"))
    while True:
        claim, new = routes.idempotency.claim(key, fingerprint, request_id, routes.worker.disconnects)
        if new:
            break
        if claim.fingerprint != fingerprint:
            raise _Refused(error_response(
                422, f"the {idempotency.HEADER} {key!r} was already used for a different request "
                     f"({claim.request_id}); use a new key for each request", "invalid_request_error",
                param=idempotency.HEADER, code="idempotency_key_reused"))
        await asyncio.wait({claim.outcome}, timeout=timeout_s)
        if not claim.outcome.done():
            raise _Refused(error_response(
                409, f"the first request with this {idempotency.HEADER} ({claim.request_id}) is still queued or "
                     f"running; retry with the same key to get its result", "conflict_error",
                code="idempotent_request_in_progress", headers={"Retry-After": "5"}))
        if not claim.outcome.cancelled():  # cancelled: it ran nothing, so this request runs it
            replay = claim.outcome.result()
            return JSONResponse(replay.body, status_code=replay.status,
                                headers={**replay.headers, "Idempotent-Replayed": "true"})
    response = await respond()
    outcome = _outcome(response)
    code = (outcome.body.get("error") or {}).get("code")
    if response.status_code == 200 or code == "refresh_failed":  # the request changed something
        routes.idempotency.settle(key, outcome)
    elif code != "worker_timeout":  # it ran nothing; a worker_timeout's late reply settles it
        routes.idempotency.forget(key)
    return response


def _outcome(response: JSONResponse) -> Outcome:
    return Outcome(response.status_code, json.loads(response.body),
                   {"X-Request-Id": response.headers.get("x-request-id", "")})


async def train(routes: TrainingRoutes, body: TrainBody, request_id: str) -> dict[str, Any]:
    """One optimizer step on the posted examples; returns when the served model has it."""
    _check_limits(routes, [e.token_lists() for e in body.examples])
    args = {"examples": [e.model_dump(exclude_none=True) for e in body.examples],
            "options": body.step_options(), "request_id": request_id}
    result = await _queued_call(routes, "train", args, body.timeout_s, request_id, paced=True)
    routes.last_step_seconds = result.get("seconds") or routes.last_step_seconds
    await _publish(routes, result, request_id)
    return result


async def logprobs(routes: TrainingRoutes, body: LogprobsBody, request_id: str) -> dict[str, Any]:
    """Per-token log-probs of ``continuation_ids`` after ``context_ids`` under the live weights."""
    _check_limits(routes, [[body.context_ids, body.continuation_ids]])
    args = body.model_dump(exclude={"timeout_s"})
    return await _queued_call(routes, "logprobs", args, body.timeout_s, request_id)


async def status(routes: TrainingRoutes, body: None, request_id: str) -> dict[str, Any]:
    """Steps, weights version, optimizer, sync state and the queue."""
    try:
        result = await routes.worker.call("status", timeout_s=STATUS_TIMEOUT_S, request_id=request_id)
    except WorkerError as exc:
        raise _Refused(_worker_error(exc, request_id))
    pacer = routes.pacer
    return {**result, "queue_depth": routes.in_flight, "max_queue": routes.max_queue,
            "pacing": {"trainer_duty": pacer.duty, "generations_in_flight": pacer.generations,
                       "paused_s": round(pacer.paused_s, 3)}}


async def checkpoint(routes: TrainingRoutes, body: CheckpointBody, request_id: str) -> dict[str, Any]:
    """Sync the live weights into the model directory now (a new generation)."""
    return await _queued_call(routes, "checkpoint", {}, body.timeout_s, request_id)


async def generations(routes: TrainingRoutes, body: None, request_id: str) -> dict[str, Any]:
    """The generations that can be rolled back to."""
    return await _queued_call(routes, "generations", {}, STATUS_TIMEOUT_S * 6, request_id)


async def rollback(routes: TrainingRoutes, body: RollbackBody, request_id: str) -> dict[str, Any]:
    """Restore a generation in the files and in the served weights (optimizer state reset)."""
    result = await _queued_call(routes, "rollback", {"generation": body.generation}, body.timeout_s, request_id)
    await _publish(routes, result, request_id)
    return result


def _documented_body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """OpenAPI for a body the route reads itself (to check its size before parsing it):
    the model's JSON schema with its definitions inlined, so it stands alone in the document."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {"requestBody": {"required": required, "content": {"application/json": {"schema": inline(schema)}}}}


router.add_api_route("/train", _handled(train, TrainBody), methods=["POST"],
                     openapi_extra=_documented_body(TrainBody))
router.add_api_route("/train/logprobs", _handled(logprobs, LogprobsBody), methods=["POST"],
                     openapi_extra=_documented_body(LogprobsBody))
router.add_api_route("/train/status", _handled(status), methods=["GET"])
router.add_api_route("/checkpoint", _handled(checkpoint, CheckpointBody), methods=["POST"],
                     openapi_extra=_documented_body(CheckpointBody, required=False))
router.add_api_route("/checkpoint", _handled(generations), methods=["GET"])
router.add_api_route("/rollback", _handled(rollback, RollbackBody), methods=["POST"],
                     openapi_extra=_documented_body(RollbackBody))
