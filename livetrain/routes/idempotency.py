"""Safe retries: a request sent again with the same ``Idempotency-Key`` runs once.

A ``/train`` that times out (504) may still apply its step once the worker gets to it,
so a client that simply retries could train twice. A client that sends an
``Idempotency-Key`` header (any printable ASCII, at most 255 characters; one per
logical request, e.g. a UUID) gets, for every retry with that key:

* the first request's response, replayed, once it has one (also when the first caller
  had given up: a late step's result is recorded when it arrives);
* while the first request is still queued or running, a wait for it;
* a 422 if the body asks for something else than the first request's did (the key
  names another request; only ``timeout_s`` may differ).

Outcomes that ran nothing (the worker not running, the queue full, a step whose turn
never came) are forgotten, so a retry runs the request. So is a request lost with a
worker that stopped before answering: a step it was killed in the middle of is undone
by the next worker, so running it again is right (unless the worker died in the
instant between committing the step and replying; that step would then run twice).
Keys are kept for ``window_s`` (an hour by default), at most ``max_keys`` of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections import OrderedDict
from typing import Any, Callable

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255


class BadKey(ValueError):
    """The header's value cannot be a key (empty, too long, or not printable ASCII)."""


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_CHARS or not all(" " < ch <= "~" for ch in key):
        raise BadKey(f"the {HEADER} header must be 1 to {MAX_KEY_CHARS} printable ASCII characters "
                     "without spaces (e.g. a UUID), one per logical request")
    return key


def fingerprint(method: str, path: str, fields: dict[str, Any]) -> str:
    """What makes two requests the same request: the route and the body's fields, except
    ``timeout_s`` (how long a caller waits is not what it asks for: a retry may wait longer)."""
    what = {key: value for key, value in fields.items() if key != "timeout_s"}
    return hashlib.sha256(f"{method} {path}\n{json.dumps(what, sort_keys=True)}".encode()).hexdigest()


@dataclasses.dataclass
class Outcome:
    """A response to replay: its status, JSON body and headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Claim:
    """One key's request: who runs it, and its outcome once there is one."""

    fingerprint: str
    request_id: str
    created: float
    worker_epoch: int  # the worker connection's disconnect count when it was sent
    outcome: asyncio.Future[Outcome] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class IdempotencyKeys:
    """The claims of recent keys. Use on one event loop.

    ``clock``: monotonic seconds (injectable for tests).
    """

    def __init__(self, window_s: float = 3600.0, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._claims: OrderedDict[str, Claim] = OrderedDict()

    def claim(self, key: str, fingerprint: str, request_id: str, worker_epoch: int) -> tuple[Claim, bool]:
        """The key's claim, and whether it is new (then the caller runs the request and
        settles the claim). An earlier claim made before the worker went away and still
        without an outcome is dropped: the request it stood for died with that worker."""
        self._expire()
        claim = self._claims.get(key)
        if claim is not None and not claim.outcome.done() and claim.worker_epoch != worker_epoch:
            self.forget(key)
            claim = None
        if claim is not None:
            return claim, False
        claim = Claim(fingerprint, request_id, self._clock(), worker_epoch)
        self._claims[key] = claim
        return claim, True

    def settle(self, key: str, outcome: Outcome) -> None:
        """Record the key's outcome; retries replay it."""
        claim = self._claims.get(key)
        if claim is not None and not claim.outcome.done():
            claim.outcome.set_result(outcome)

    def settle_request(self, request_id: str, outcome: Outcome | None) -> None:
        """A late result for the request ``request_id`` (None: it did not run)."""
        for key, claim in list(self._claims.items()):
            if claim.request_id == request_id:
                if outcome is None:
                    self.forget(key)
                else:
                    self.settle(key, outcome)

    def forget(self, key: str) -> None:
        """The key's request ran nothing: a retry runs it. Retries waiting on it are told
        to run it themselves."""
        claim = self._claims.pop(key, None)
        if claim is not None and not claim.outcome.done():
            claim.outcome.cancel()

    def _expire(self) -> None:
        now = self._clock()
        while self._claims:
            key, claim = next(iter(self._claims.items()))
            if now - claim.created <= self.window_s and len(self._claims) < self.max_keys:
                return
            self._claims.pop(key)
            if not claim.outcome.done():
                claim.outcome.cancel()
