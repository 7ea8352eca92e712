"""Messages between the HTTP routes and the training worker process.

Plain dicts, JSON-encoded, one frame each. A request is
``{"op": OP, "id": REQUEST_ID, "deadline": UNIX_TIME | None, "args": {...}}``;
a reply is ``{"id": REQUEST_ID, "ok": True, "result": {...}}`` or
``{"id": REQUEST_ID, "ok": False, "error": {"type", "message", "param", "code"}}``
(the fields of OpenAI's error object, so the routes pass it on unchanged).

Operations and their ``args``:

* ``train``: ``examples`` (list of dicts with ``context_ids`` and either
  ``continuation_ids`` or ``chosen_ids`` + ``rejected_ids``), ``options`` (fields of
  ``livetrain.train.step.StepOptions``: loss, lr, dry_run, max_grad_norm, ...),
  ``request_id``. Result: the step report plus ``weights_version`` and
  ``changed_tensors`` (Hugging Face names, empty unless the step was applied).
* ``logprobs``: ``context_ids``, ``continuation_ids``. Result: ``logprobs``, ``sum``.
* ``status``: no args; answered at once, even while a step runs.
* ``checkpoint``: sync now. ``generations``: list them. ``rollback``: ``generation``.
* ``shutdown``: finish the running job, sync, exit.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

OPS = ("train", "logprobs", "status", "checkpoint", "generations", "rollback", "shutdown")

# Error types (OpenAI's `error.type`), each with the HTTP status the routes answer.
INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
TIMEOUT = "timeout_error"
UNAVAILABLE = "service_unavailable_error"
INTERNAL = "internal_error"
HTTP_STATUS = {INVALID_REQUEST: 400, NOT_FOUND: 404, TIMEOUT: 504, UNAVAILABLE: 503, INTERNAL: 500}


class WorkerError(Exception):
    """A request the training worker refused or failed; carries OpenAI's error fields."""

    def __init__(self, message: str, type: str = INTERNAL, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    @classmethod
    def from_dict(cls, error: dict[str, Any]) -> "WorkerError":
        return cls(error.get("message", "unknown error"), error.get("type", INTERNAL),
                   error.get("param"), error.get("code"))


def new_request_id() -> str:
    return "train-" + uuid.uuid4().hex[:16]


def request(op: str, args: dict[str, Any] | None = None, *, request_id: str | None = None,
            deadline: float | None = None) -> dict[str, Any]:
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(OPS)}")
    return {"op": op, "id": request_id or new_request_id(), "deadline": deadline, "args": args or {}}


def ok_reply(request_id: str | None, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: str | None, error: WorkerError) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": error.to_dict()}


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


def decode(frame: bytes) -> dict[str, Any]:
    message = json.loads(frame)
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message
