"""When to sync: a set interval after the last change, on demand, and at close.

Training marks the weights dirty after each applied step; the scheduler syncs once the
weights have been quiet for `interval_s` (each new step pushes the sync back), so a
burst of steps costs one sync. Syncs never overlap: a background sync and `sync_now`
take the same lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

R = TypeVar("R")


class SyncScheduler(Generic[R]):
    """Debounced calls of `sync_fn` (e.g. ``lambda: directory.sync(live)``).

    A failed background sync is kept in `last_error` and retried `interval_s` later;
    `sync_now` and `close` raise it to their caller instead.
    """

    def __init__(self, sync_fn: Callable[[], R], interval_s: float = 600.0):
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self._sync_fn = sync_fn
        self.interval_s = interval_s
        self._sync_lock = threading.Lock()  # one sync at a time
        self._state = threading.Condition()
        self._due: float | None = None  # monotonic time of the next sync; None when clean
        self._closed = False
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-sync", daemon=True)
        self._thread.start()

    @property
    def dirty(self) -> bool:
        """Whether changes wait for a sync."""
        with self._state:
            return self._due is not None

    def mark_dirty(self) -> None:
        """The weights changed: sync `interval_s` from now (pushing back a pending sync)."""
        with self._state:
            if self._closed:
                raise RuntimeError("the sync scheduler is closed")
            self._due = time.monotonic() + self.interval_s
            self._state.notify()

    def sync_now(self) -> R:
        """Sync at once (waiting for a running sync to finish first) and return its result."""
        with self._sync_lock:
            with self._state:
                self._due = None
            try:
                result = self._sync_fn()
            except BaseException:
                with self._state:  # the changes are still unsynced
                    if self._due is None and not self._closed:
                        self._due = time.monotonic() + self.interval_s
                raise
            return result

    def close(self) -> R | None:
        """Stop the timer and sync what is dirty; returns that sync's result (or None)."""
        with self._state:
            if self._closed:
                return None
            self._closed = True
            dirty = self._due is not None
            self._state.notify()
        self._thread.join()
        return self.sync_now() if dirty else None

    def _run(self) -> None:
        while True:
            with self._state:
                while not self._closed and (self._due is None or self._due > time.monotonic()):
                    wait = None if self._due is None else self._due - time.monotonic()
                    self._state.wait(wait)
                if self._closed:
                    return
            try:
                self.sync_now()
                self.last_error = None
            except Exception as exc:  # kept for the owner to read; retried after the interval
                self.last_error = exc
