"""The optimizer's part of a training step, behind one seam: which weight gradients are
kept as factors, the gradients' norms, clipping, the update, and its bound.

The step (`livetrain.train.step`) computes the gradients and asks this module for the
rest; the special cases of `Apollo` (factored gradients, clipping folded into its step,
norms reused) live here only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from livetrain.optim import Apollo
from livetrain.optim.grad_factors import GradFactors, has_gradient

__all__ = ["apply_update", "factored_weights", "gradient_norms", "combined_norm"]


def factored_weights(optimizer: torch.optim.Optimizer, rows: int) -> GradFactors | None:
    """The weights whose gradients over ``rows`` token rows a step keeps as factors: APOLLO
    weights where that takes less memory (`GradFactors.worth_it`). None for other optimizers."""
    if not isinstance(optimizer, Apollo):
        return None
    return GradFactors(p for group in optimizer.param_groups if group["rank"] is not None
                       for p in group["params"] if p.requires_grad and GradFactors.worth_it(p, rows))


def gradient_norms(params: Sequence[torch.Tensor], factors: GradFactors | None) -> dict[torch.Tensor, torch.Tensor]:
    """The L2 norm (0-dim, float32) of each parameter's gradient: its ``.grad``, or its factors."""
    norms = {p: factors.norm(p) for p in factors.recorded()} if factors is not None else {}
    for p in params:
        if p.grad is not None:
            norms[p] = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
    return norms


def combined_norm(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of several tensors together, from their own L2 norms (0-dim each)."""
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(list(norms)))


@torch.no_grad()
def apply_update(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], *, lr: float | None,
                 clip: float | None, grad_norms: dict[torch.Tensor, torch.Tensor], factors: GradFactors | None,
                 before: Sequence[torch.Tensor] | None = None, measure: bool = False,
                 max_update_norm: float | None = None) -> float | None:
    """``optimizer.step()`` at ``lr`` (None: the optimizer's own) on the gradients times
    ``clip`` (None: as they are); returns the update's L2 norm when measured.

    `Apollo` takes the clip factor, the gradients' norms (by parameter, before clipping)
    and the factored gradients into its step; other optimizers get the gradients
    rescaled first. ``before``: copies of ``params`` the caller already took (then the
    update is always measured against them); else ``measure`` or ``max_update_norm``
    takes copies. A non-finite update is undone (weights restored bit for bit); one
    over ``max_update_norm`` is scaled down to it.
    """
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    stepped = [p for p in params if has_gradient(p, factors)]
    if before is not None:
        if len(before) != len(params):
            raise ValueError(f"{len(before)} pre-step copies for {len(params)} parameters")
        before = [b for p, b in zip(params, before) if has_gradient(p, factors)]
    elif measure or max_update_norm is not None:
        before = [p.detach().clone() for p in stepped]
    try:
        if isinstance(optimizer, Apollo):
            optimizer.step(grad_scale=clip, grad_norms=grad_norms, grad_factors=factors)
        else:
            if clip is not None:
                for p in stepped:
                    p.grad.mul_(clip)
            optimizer.step()
    finally:
        for group, value in zip(optimizer.param_groups, saved_lr):
            group["lr"] = value
    if before is None:
        return None

    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(weight now, weight before), one at a time: scratch memory for one weight, also
        when the copies are in host memory and the weights on a GPU."""
        for p, b in zip(stepped, before):
            yield p.detach(), b.to(p.device, non_blocking=True)

    update_norm = combined_norm([torch.linalg.vector_norm(now - then, dtype=torch.float32)
                                 for now, then in pairs()]).item()  # the one host sync
    if not math.isfinite(update_norm):
        for now, then in pairs():
            now.copy_(then)
    elif max_update_norm is not None and update_norm > max_update_norm:
        for now, then in pairs():  # p <- before + factor * (p - before)
            now.lerp_(then, 1.0 - max_update_norm / update_norm)
        update_norm = max_update_norm
    return update_norm
