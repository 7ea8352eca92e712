"""The optimizer state on disk, with the step counters it belongs to.

Saved with ``torch.save`` (and loaded with ``weights_only=True``) as
``{"format", "optimizer", "train_modules", "param_names", "steps_applied",
"weights_version", "state_dict"}``: in ``DIR/.livetrain/optimizer.pt`` at every sync,
and beside a shared copy after every applied step. A saved state is restored only into
the same optimizer training the same tensors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

STATE_FORMAT = 1


@dataclass(frozen=True)
class StateOwner:
    """What a saved optimizer state belongs to: the optimizer, its train-modules pattern
    and the names of the tensors it trains, in order."""

    optimizer: str
    train_modules: str
    param_names: tuple[str, ...]

    def serialize(self, optimizer: torch.optim.Optimizer, steps_applied: int, weights_version: int) -> bytes:
        payload = {"format": STATE_FORMAT, "optimizer": self.optimizer, "train_modules": self.train_modules,
                   "param_names": list(self.param_names), "steps_applied": steps_applied,
                   "weights_version": weights_version, "state_dict": optimizer.state_dict()}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    def newest(self, saved: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
        """The newest of ``saved`` (payloads, loaded) that belongs to this owner, and how
        the optimizer state starts: ``restored (N steps)``, or ``new`` and why."""
        if not saved:
            return None, "new"
        mine = (STATE_FORMAT, self.optimizer, self.train_modules, list(self.param_names))
        fitting = [state for state in saved if mine == (state.get("format"), state.get("optimizer"),
                                                        state.get("train_modules"), state.get("param_names"))]
        if not fitting:
            return None, (f"new (the saved state is for {saved[0].get('optimizer')} on "
                          f"{saved[0].get('train_modules')!r}; it will be replaced at the next sync)")
        newest = max(fitting, key=lambda state: state["weights_version"])
        return newest, f"restored ({int(newest['steps_applied'])} steps)"


def load(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), weights_only=True)
