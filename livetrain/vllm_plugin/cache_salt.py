"""Prefix-cache keys that name the weights they were computed with.

vLLM's prefix cache reuses the KV blocks of any earlier request that shares a prompt
prefix. After a training step those blocks hold keys and values of the old weights. vLLM
can drop them only while no request holds a block (`reset_prefix_cache()`); forcing it
(`reset_running_requests=True`) preempts every running request, which then recomputes
from scratch, once per step: under continuous training that halves single-stream
throughput and breaks HOGWILD's promise that in-flight requests keep their KV.

Instead, every generation request gets a `cache_salt` (vLLM's own per-request
prefix-cache namespace) that names the served weights' refresh count: after a refresh,
new requests hash their blocks differently and can never match a block of the old
weights, while running requests keep theirs. The stale blocks are evicted like any
unused block (and dropped at once whenever a plain reset succeeds). A client's own
salt is kept: the served one is appended to it. Before the first refresh nothing is
rewritten.

`PrefixCacheSalt` is an ASGI middleware on vLLM's app (added by the endpoint plugin);
it rewrites the JSON body of the OpenAI- and Anthropic-compatible generation routes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["PrefixCacheSalt", "SALTED_PATHS", "is_generation_request", "salted_body", "served_salt"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# vLLM's routes whose request body takes a `cache_salt`.
SALTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"})


def is_generation_request(scope: Scope) -> bool:
    """A POST to one of vLLM's OpenAI- or Anthropic-compatible generation routes."""
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in SALTED_PATHS


# vLLM refuses salts longer than this (and with '@', '/', '\\' or NUL; ours use none).
_MAX_SALT_CHARS = 128


def served_salt(client_salt: object, refreshes: int) -> object:
    """The salt a request is served with: the client's (if any) followed by the refresh count.

    A client salt that is not a non-empty string is returned as it is, for vLLM to refuse
    with its own message; one too long to extend is replaced by its SHA-256 first.
    """
    suffix = f"~livetrain-{refreshes}"
    if client_salt is None:
        return suffix[1:]
    if not isinstance(client_salt, str) or not client_salt:
        return client_salt
    if len(client_salt) + len(suffix) > _MAX_SALT_CHARS:
        client_salt = hashlib.sha256(client_salt.encode()).hexdigest()
    return client_salt + suffix


def salted_body(body: bytes, refreshes: int) -> bytes:
    """``body`` with its ``cache_salt`` set by `served_salt`; a body that is not a JSON
    object, or that Python's parser cannot take (e.g. nested too deeply), comes back
    unchanged, so vLLM answers it exactly as it would have."""
    try:
        request = json.loads(body)
        if not isinstance(request, dict):
            return body
        request["cache_salt"] = served_salt(request.get("cache_salt"), refreshes)
        return json.dumps(request).encode()
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return body


class PrefixCacheSalt:
    """ASGI middleware: salts the body of every POST to `SALTED_PATHS` with
    ``refreshes(scope)``, the served weights' refresh count. Until the first refresh
    (None or 0) requests pass through untouched: every block holds the loaded weights."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 refreshes: Callable[[Scope], int | None]) -> None:
        self.app = app
        self.refreshes = refreshes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refreshes = self.refreshes(scope) if is_generation_request(scope) else None
        if not refreshes:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                await self.app(scope, _replay(message, receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = salted_body(b"".join(chunks), refreshes)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers},
                       _replay({"type": "http.request", "body": body, "more_body": False}, receive), send)


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive that gives ``first``, then the client's messages (a streaming response
    listens on it for the disconnect)."""
    pending = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
