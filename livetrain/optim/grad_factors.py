"""Linear layers' weight gradients kept as their factors, for short continuations.

Over N token rows a linear layer's weight gradient is G = dYᵀ·X: dY [N, out] the output
gradients, X [N, in] the inputs, so G has rank at most N. A cache-hit step trains on 64
tokens, and the weights it trains are 576 x 1536: materialising G writes m·n floats that
the step then reads three more times (the clipping norm, APOLLO's projection, the
update). APOLLO needs none of them dense:

    ‖G‖²          = Σ (dY·dYᵀ) ∘ (X·Xᵀ)       two N x N Gram matrices
    row norms²    = Σ_t ((X·Xᵀ)·dY ∘ dY)       per output, (out,)
    column norms² = Σ_t ((dY·dYᵀ)·X ∘ X)       per input, (in,)
    G·Pᵀ          = dYᵀ·(X·Pᵀ),  P·G = (P·dYᵀ)·X
    W += c·G      = one matrix product into W (W.addmm_)

So while a `GradFactors` is recording (`recording_factors`), a linear layer on one of
its weights saves (dY, X) in backward instead of computing G (the training step's linear
layer, `livetrain.train.linear`, asks `factors_for`), and `Apollo.step` takes them. A weight is
factored only where its factors are at most half the size of its gradient (N·(m + n) ≤
m·n / 2), so the Gram matrices stay cheap and memory falls; longer batches get dense
gradients as before. A weight that also gets a gradient some other way (a tied
embedding that is trained) has its factors added into that gradient (`fold_into_grads`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Iterator

import torch

__all__ = ["GradFactors", "MAX_SIZE_FRACTION", "factors_for", "has_gradient", "recording_factors"]

# A weight is factored when its factors take at most this fraction of its gradient's size.
MAX_SIZE_FRACTION = 0.5


class GradFactors:
    """The factors (dY [N, out], X [N, in], float32) of some weights' gradients G = dYᵀ·X,
    recorded by linear layers' backward over one step (rows of several calls concatenated)."""

    def __init__(self, weights: Iterable[torch.Tensor]) -> None:
        self._parts: dict[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] = {w: [] for w in weights}

    @staticmethod
    def worth_it(weight: torch.Tensor, rows: int) -> bool:
        """Whether a 2-D weight's gradient over `rows` token rows is better kept as factors."""
        m, n = weight.shape
        return rows * (m + n) <= MAX_SIZE_FRACTION * m * n

    def __contains__(self, weight: torch.Tensor) -> bool:
        return weight in self._parts

    def __len__(self) -> int:
        return len(self._parts)

    def record(self, weight: torch.Tensor, grad_rows: torch.Tensor, input_rows: torch.Tensor) -> None:
        """Add rows: `grad_rows` [N, out] (dY) and `input_rows` [N, in] (X) of one call.

        Kept detached: an input saved for backward still points into the autograd graph,
        whose nodes hold this object, a cycle that would keep every step's graph alive."""
        self._parts[weight].append((grad_rows.detach().float(), input_rows.detach().float()))

    def get(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(dY [N, out], X [N, in]) of `weight`'s gradient, None if nothing was recorded."""
        parts = self._parts.get(weight)
        if not parts:
            return None
        if len(parts) > 1:  # one product from here on, not one per call
            parts[:] = [(torch.cat([g for g, _ in parts]), torch.cat([x for _, x in parts]))]
        return parts[0]

    def recorded(self) -> list[torch.Tensor]:
        """The weights that have factors."""
        return [w for w, parts in self._parts.items() if parts]

    def norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖G‖ (0-dim, float32) from the two N x N Gram matrices."""
        grad_rows, input_rows = self.get(weight)
        squared = (grad_rows @ grad_rows.T).mul_(input_rows @ input_rows.T).sum()
        return squared.clamp_min_(0).sqrt_()

    def channel_norms(self, weight: torch.Tensor, dim: int) -> torch.Tensor:
        """‖G‖ along `dim`, as `torch.linalg.vector_norm(G, dim=dim)`: dim 1 gives a norm
        per output (row) [out], dim 0 one per input (column) [in]."""
        grad_rows, input_rows = self.get(weight)
        if dim == 1:
            squared = ((input_rows @ input_rows.T) @ grad_rows).mul_(grad_rows).sum(0)
        else:
            squared = ((grad_rows @ grad_rows.T) @ input_rows).mul_(input_rows).sum(0)
        return squared.clamp_min_(0).sqrt_()

    def fold_into_grads(self) -> None:
        """Add the factors of weights that also have a dense `.grad` into it (G += dYᵀ·X)."""
        for weight in self.recorded():
            if weight.grad is not None:
                grad_rows, input_rows = self.get(weight)
                weight.grad.addmm_(grad_rows.T.to(weight.grad.dtype), input_rows.to(weight.grad.dtype))
                self._parts[weight].clear()


def has_gradient(weight: torch.Tensor, factors: GradFactors | None) -> bool:
    """Whether `weight` has a gradient this step: a `.grad`, or factors in `factors`."""
    return weight.grad is not None or (factors is not None and factors.get(weight) is not None)


_RECORDING: contextvars.ContextVar[GradFactors | None] = contextvars.ContextVar("livetrain_grad_factors",
                                                                                default=None)


@contextlib.contextmanager
def recording_factors(factors: GradFactors | None) -> Iterator[None]:
    """Within it, linear layers run with grad on ``factors``' weights record factors
    instead of gradients (in the backward calls made later too). None: nothing changes."""
    token = _RECORDING.set(factors if factors is not None and len(factors) else None)
    try:
        yield
    finally:
        _RECORDING.reset(token)


def factors_for(weight: torch.Tensor) -> GradFactors | None:
    """The `GradFactors` a linear layer on ``weight`` records into now (None: a dense gradient)."""
    factors = _RECORDING.get()
    if factors is None or weight not in factors or not torch.is_grad_enabled():
        return None
    return factors
