"""Linear layers that record their weight gradient's factors (dY, X) instead of G = dYᵀ·X.

`train_step` runs a short batch's forward inside `recording_factors(factors)`: every
linear layer on one of `factors`' weights then saves its output gradient and input rows
in backward and gives the weight no `.grad`; `Apollo.step` applies the update from them
(`livetrain.optim.grad_factors`). A half-precision weight under `Float32Compute` is that
mode's linear layer, which asks `factors_for` too.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from livetrain.optim.grad_factors import GradFactors

__all__ = ["recording_factors", "factors_for", "linear_arguments"]

_ACTIVE: contextvars.ContextVar[GradFactors | None] = contextvars.ContextVar("livetrain_grad_factors",
                                                                             default=None)


def factors_for(weight: torch.Tensor) -> GradFactors | None:
    """The `GradFactors` a linear layer on `weight` records into now (None: a dense gradient)."""
    factors = _ACTIVE.get()
    if factors is None or weight not in factors or not torch.is_grad_enabled():
        return None
    return factors


class _FactoredLinear(torch.autograd.Function):
    """y = x·Wᵀ + b for `x` [..., in], `weight` [out, in], `bias` [out]; backward records
    the weight gradient's factors into `factors` and returns none for the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, factors):
        ctx.save_for_backward(x, weight)
        ctx.factors = factors
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        ctx.factors.record(weight, grad_rows, x.reshape(-1, x.shape[-1]))
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_b = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


class _RecordingMode(TorchFunctionMode):
    """Routes linear layers on recorded weights through `_FactoredLinear`. A half-precision
    weight on fp32 input is `Float32Compute`'s (it records through `factors_for` too)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = linear_arguments(*args, **kwargs)
            factors = factors_for(weight)
            float32_compute = x.dtype == torch.float32 and weight.dtype != torch.float32
            if factors is not None and not float32_compute:
                return _FactoredLinear.apply(x, weight, bias, factors)
        return func(*args, **kwargs)


def linear_arguments(input, weight, bias=None):
    """F.linear's arguments, however they were passed."""
    return input, weight, bias


@contextmanager
def recording_factors(factors: GradFactors | None) -> Iterator[None]:
    """Within it, linear layers on `factors`' weights record factors instead of gradients
    (for backward calls made later too: the layers keep `factors` for their backward).
    None: nothing changes."""
    if factors is None or not len(factors):
        yield
        return
    token = _ACTIVE.set(factors)
    try:
        with _RecordingMode():
            yield
    finally:
        _ACTIVE.reset(token)
