"""The linear layer of a training step, where its two speed-ups plug in.

Two independent choices change how ``F.linear(x, W, b)`` runs in a step:

* how it multiplies: natively, or in fp32 on copies of blocks of a half-precision weight
  (`livetrain.train.compute_dtype`), given as a `LinearCompute`;
* what backward does with the weight's gradient: a dense ``W.grad``, or, for the weights
  a `GradFactors` is recording (`livetrain.optim.grad_factors.recording_factors`), its
  factors (dY, X) and no ``.grad``.

`LinearSeam`, a torch function mode, sends a linear layer through `_Linear` when either
applies and leaves every other call alone. Each speed-up only sets its own choice, so
they compose without knowing of each other.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from livetrain.optim.grad_factors import GradFactors, factors_for

__all__ = ["LinearCompute", "NativeCompute", "computing_linears", "linear_seam"]


class LinearCompute(Protocol):
    """How a linear layer multiplies: y = x·Wᵀ + b and the two gradient products."""

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this compute takes a layer with input ``x`` and ``weight``."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y [..., out] from x [..., in], weight [out, in], bias [out]."""

    def input_grad(self, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """dX [..., in] = dY [..., out] · W."""

    def weight_grad(self, grad_rows: torch.Tensor, input_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """dW [out, in] = dYᵀ · X, in the weight's dtype, from dY [N, out] and X [N, in]."""


class NativeCompute:
    """The layer as PyTorch computes it, in its tensors' own dtypes."""

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return True

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def input_grad(self, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return grad_out @ weight

    def weight_grad(self, grad_rows: torch.Tensor, input_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return grad_rows.t() @ input_rows


_NATIVE = NativeCompute()
_COMPUTE: contextvars.ContextVar[LinearCompute | None] = contextvars.ContextVar("livetrain_linear_compute",
                                                                                default=None)
_SEAM_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("livetrain_linear_seam", default=False)


class _Linear(torch.autograd.Function):
    """y = x·Wᵀ + b through ``compute``; backward records W's gradient into ``factors``
    when given (returning none for W), else asks ``compute`` for it. Saves the weight
    itself for backward, never a copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute: LinearCompute, factors: GradFactors | None):
        ctx.save_for_backward(x, weight)
        ctx.compute, ctx.factors = compute, factors
        ctx.bias_dtype = None if bias is None else bias.dtype
        return compute.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        input_rows = x.reshape(-1, x.shape[-1])               # [N, in]
        grad_w = None
        if need_w and ctx.factors is not None:
            ctx.factors.record(weight, grad_rows, input_rows)
        elif need_w:
            grad_w = ctx.compute.weight_grad(grad_rows, input_rows, weight)
        grad_x = ctx.compute.input_grad(grad_out, weight) if need_x else None
        grad_b = grad_rows.sum(0).to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return grad_x, grad_w, grad_b, None, None


class LinearSeam(TorchFunctionMode):
    """Routes ``F.linear`` through `_Linear` when a `LinearCompute` set by
    `computing_linears` takes it or its weight's gradient is being recorded as factors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_arguments(*args, **kwargs)
            compute = _COMPUTE.get()
            if compute is not None and not compute.applies(x, weight):
                compute = None
            factors = factors_for(weight)
            if compute is not None or factors is not None:
                return _Linear.apply(x, weight, bias, compute or _NATIVE, factors)
        return func(*args, **kwargs)


def _linear_arguments(input, weight, bias=None):
    """F.linear's arguments, however they were passed."""
    return input, weight, bias


@contextlib.contextmanager
def linear_seam(enabled: bool = True) -> Iterator[None]:
    """Within it, linear layers honour `computing_linears` and recorded factors (entering
    it again inside does nothing; neither does ``enabled`` False, which spares every
    other call of the forward the mode's dispatch)."""
    if _SEAM_ACTIVE.get() or not enabled:
        yield
        return
    token = _SEAM_ACTIVE.set(True)
    try:
        with LinearSeam():
            yield
    finally:
        _SEAM_ACTIVE.reset(token)


@contextlib.contextmanager
def computing_linears(compute: LinearCompute) -> Iterator[None]:
    """Within it, linear layers that ``compute`` takes are computed by it."""
    token = _COMPUTE.set(compute)
    try:
        with linear_seam():
            yield
    finally:
        _COMPUTE.reset(token)
