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


class TurnTimeout(TimeoutError):
    """A step's turn did not come within the time it was allowed to wait; it never ran."""


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
    async def turn(self, wait_at_most_s: float | None = None) -> AsyncIterator[float]:
        """Hold the trainer for one step: steps take turns, and while generation is in
        flight each starts no sooner than its predecessor's pause allows. Yields the
        seconds spent waiting; raises TurnTimeout if the turn would take longer than
        ``wait_at_most_s`` to come (the step never started)."""
        arrived = self._clock()
        try:
            async with asyncio.timeout(wait_at_most_s):
                await self._turn.acquire()
        except TimeoutError:
            raise TurnTimeout(f"the steps before this one outlasted {wait_at_most_s:g} s") from None
        try:
            while self.generations > 0 and (wait := self._next_start - self._clock()) > 0:
                if wait_at_most_s is not None and self._clock() + wait - arrived > wait_at_most_s:
                    raise TurnTimeout(f"the pause before this step outlasts {wait_at_most_s:g} s")
                self.paused_s += wait
                await self._sleep(wait)
            started = self._clock()
            try:
                yield started - arrived
            finally:
                ended = self._clock()
                self._next_start = ended + (ended - started) * (1 - self.duty) / self.duty
        finally:
            self._turn.release()
