"""A bounded cache of frozen context states, keyed by their token prefix.

The context's no-grad prefill is most of a context-frozen step when continuations are
short. A context trained on again (examples sharing a conversation, a dream loop's
variations, a second epoch) then costs only its continuation. A cached state was
computed with the weights of its time, so reuse is bounded: by the number of applied
steps since, and optionally by the summed norm of the updates since. The longest cached
prefix of a new context is extended rather than recomputed (correct for every cache
type the forked state supports, recurrent states included, since it only appends).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from livetrain.train.frozen_context import FrozenContext, prefill

__all__ = ["ContextCache", "ContextLookup"]


@dataclass(frozen=True)
class ContextLookup:
    """How a context's state was obtained: `hit` (exact), `extended` (a cached prefix of
    `reused_tokens` tokens plus a prefill of the rest), or `miss` (full prefill)."""

    kind: Literal["hit", "extended", "miss"]
    reused_tokens: int


@dataclass(eq=False)
class _Entry:
    frozen: FrozenContext
    nbytes: int
    step: int             # applied steps counted when this state was computed
    update_norm: float    # summed update norm at that time


class ContextCache:
    """LRU cache of `FrozenContext`s, bounded in bytes and in staleness.

    max_bytes: total size of the cached states; least recently used go first.
    max_age_steps: a state computed more than this many applied steps ago is dropped
        (0: reuse only within the step that computed it; None: no step bound).
    max_update_norm: a state is dropped once the updates applied since sum to more than
        this L2 norm (None: no norm bound).
    enabled: False turns the cache into a pass-through (every lookup is a miss).
    """

    def __init__(self, max_bytes: int = 512 * 2**20, max_age_steps: int | None = 8,
                 max_update_norm: float | None = None, enabled: bool = True) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if max_age_steps is not None and max_age_steps < 0:
            raise ValueError(f"max_age_steps must be >= 0 or None, got {max_age_steps}")
        if max_update_norm is not None and max_update_norm < 0:
            raise ValueError(f"max_update_norm must be >= 0 or None, got {max_update_norm}")
        self.max_bytes = max_bytes
        self.max_age_steps = max_age_steps
        self.max_update_norm = max_update_norm
        self.enabled = enabled
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._bytes = 0
        self._step = 0
        self._update_norm = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def note_update(self, update_norm: float | None) -> None:
        """Record one applied optimizer step (its update's L2 norm, if known).

        An unknown norm counts as unbounded: with `max_update_norm` set, it drops everything.
        """
        self._step += 1
        if update_norm is None and self.max_update_norm is not None:
            self.clear()
            return
        self._update_norm += update_norm or 0.0
        for key in [k for k, e in self._entries.items() if self._is_stale(e)]:
            self._drop(key)

    def clear(self) -> None:
        """Drop every state (e.g. after the weights were replaced or rolled back)."""
        self._entries.clear()
        self._bytes = 0

    def get(self, model: torch.nn.Module, prefix_ids: torch.Tensor) -> tuple[FrozenContext, ContextLookup]:
        """The frozen state after `prefix_ids` ([T] token ids), from the cache if possible.

        The state is computed with `model`'s current weights when not cached, then cached.
        """
        if not self.enabled or self.max_bytes == 0:
            return prefill(model, prefix_ids), ContextLookup("miss", 0)
        key = tuple(prefix_ids.tolist())
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry.frozen, ContextLookup("hit", len(key))
        base_key = self._longest_cached_prefix(key)
        if base_key is None:
            frozen, lookup = prefill(model, prefix_ids), ContextLookup("miss", 0)
        else:
            self._entries.move_to_end(base_key)
            base = self._entries[base_key].frozen
            frozen = prefill(model, prefix_ids[len(base_key):], base=base)
            lookup = ContextLookup("extended", len(base_key))
        self._put(key, frozen)
        return frozen, lookup

    def _longest_cached_prefix(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        best: tuple[int, ...] | None = None
        for cached in self._entries:
            if len(cached) < len(key) and (best is None or len(cached) > len(best)) \
                    and key[:len(cached)] == cached:
                best = cached
        return best

    def _put(self, key: tuple[int, ...], frozen: FrozenContext) -> None:
        nbytes = frozen.nbytes()
        if nbytes > self.max_bytes:
            return
        while self._bytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = _Entry(frozen, nbytes, self._step, self._update_norm)
        self._bytes += nbytes

    def _drop(self, key: Sequence[int]) -> None:
        self._bytes -= self._entries.pop(tuple(key)).nbytes

    def _is_stale(self, entry: _Entry) -> bool:
        if self.max_age_steps is not None and self._step - entry.step > self.max_age_steps:
            return True
        return self.max_update_norm is not None and \
            self._update_norm - entry.update_norm > self.max_update_norm
