"""Inference first: training steps are paced while generation requests are in flight.

On a machine with few cores the trainer's steps and vLLM's forward passes share the
CPU. While at least one generation request is in flight, a step of ``t`` seconds is
followed by a pause of ``t * (1 - duty) / duty`` before the next step starts, so the
trainer is busy at most ``duty`` of the time; with no generation in flight (or
``duty`` 1) steps run back to back. The serving side reports generations as they start
and finish (`livetrain.vllm_plugin.generation_count`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable


class StepPacer:
    """Paces training steps against in-flight generation requests (see the module).

    ``clock`` and ``sleep`` are injectable for tests (default: the monotonic clock and
    ``asyncio.sleep``).
    """

    def __init__(self, duty: float = 1.0, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if not 0 < duty <= 1:
            raise ValueError(f"the trainer's duty must be in (0, 1], not {duty}")
        self.duty = duty
        self.generations = 0  # generation requests in flight
        self.paused_s = 0.0  # total pause so far
        self._clock, self._sleep = clock, sleep
        self._next_start = 0.0
        self._turn = asyncio.Lock()

    def generation_started(self) -> None:
        self.generations += 1

    def generation_finished(self) -> None:
        self.generations -= 1

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold the trainer for one step: steps take turns, and while generation is in
        flight each starts no sooner than its predecessor's pause allows."""
        async with self._turn:
            while self.generations > 0 and (wait := self._next_start - self._clock()) > 0:
                self.paused_s += wait
                await self._sleep(wait)
            started = self._clock()
            try:
                yield
            finally:
                ended = self._clock()
                self._next_start = ended + (ended - started) * (1 - self.duty) / self.duty
