"""The probe guard: a step that moves a fixed, ordinary text's log-probs too far is undone.

A teaching step should move what it teaches and leave ordinary text alone; one that
shifts a plain sentence's mean per-token log-prob by more than ``max_drift`` nats has
done damage (a too-large learning rate, a poisoned example), whatever its loss says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from livetrain.train.step import Refusal, StepResult, continuation_logprobs

PROBE_TEXT = ("The river flows past the old mill and into the valley, where farmers grow wheat "
              "and barley. In winter the water freezes near the banks.")


@dataclass(frozen=True)
class ProbeGuard:
    """The probe text (as token ids) and the most its mean per-token log-prob may change in
    one step, in nats (0.5 by default: far above what a teaching step moves ordinary
    text, far below what a destructive one does)."""

    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    max_drift: float = 0.5

    @classmethod
    def from_text(cls, tokenizer: Any, text: str = PROBE_TEXT, max_drift: float = 0.5) -> "ProbeGuard":
        ids = tuple(tokenizer(text)["input_ids"])
        return cls(ids[:4], ids[4:], max_drift)


class ProbeCheck:
    """Judges applied steps by a `ProbeGuard`, keeping the probe's mean log-prob under the
    live weights between steps."""

    def __init__(self, guard: ProbeGuard) -> None:
        self.guard = guard
        self._logp: float | None = None

    def before_step(self, model: torch.nn.Module) -> None:
        """Measure the probe under the live weights, unless already known."""
        if self._logp is None:
            self._logp = self._mean_logp(model)

    def check(self, model: torch.nn.Module, result: StepResult) -> float:
        """The probe's drift after an applied step; over the bound, ``result`` is marked
        refused (the caller restores the weights)."""
        after = self._mean_logp(model)
        drift = after - self._logp
        if math.isfinite(drift) and abs(drift) <= self.guard.max_drift:
            self._logp = after
        else:
            result.refuse(Refusal.PROBE_DRIFT, f"the probe text's mean log-prob moved {drift:+.3f} nats/token, "
                                               f"more than {self.guard.max_drift} (step undone)")
        return drift

    def forget(self) -> None:
        """The weights changed by other means (a rollback): measure again before the next step."""
        self._logp = None

    def _mean_logp(self, model: torch.nn.Module) -> float:
        return continuation_logprobs(model, self.guard.context_ids, self.guard.continuation_ids).mean().item()
