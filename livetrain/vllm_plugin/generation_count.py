"""Counts vLLM's generation requests in flight, for the training side's `StepPacer`.

`GenerationCount` is an ASGI middleware on vLLM's app (added by the endpoint plugin): a
POST to a generation route counts from its arrival until its response has been sent
(a streamed one until its last chunk), or until it fails.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from livetrain.routes.pacing import StepPacer
from livetrain.vllm_plugin.cache_salt import Receive, Scope, Send, is_generation_request


class GenerationCount:
    """ASGI middleware: tells ``pacer(scope)`` (None: nobody listens yet) when each
    generation request starts and finishes."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 pacer: Callable[[Scope], StepPacer | None]) -> None:
        self.app = app
        self.pacer = pacer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pacer = self.pacer(scope) if is_generation_request(scope) else None
        if pacer is None:
            await self.app(scope, receive, send)
            return
        pacer.generation_started()
        try:
            await self.app(scope, receive, send)
        finally:
            pacer.generation_finished()
