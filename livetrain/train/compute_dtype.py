"""Float32 compute for a bf16/fp16 model on a CPU without native half-precision matrix units.

The served weights are bf16 (vLLM's CPU default) and the trainer works on views of them,
so its forward and backward would run in bf16 too. CPUs without AVX512-BF16 or AMX (every
AVX2-only x86 CPU) emulate bf16 matrix products, several times slower than fp32 ones
(docs/benchmarks.md). On such a CPU the training forward runs under `Float32Compute`: the
weights stay where and what they are (bf16, shared with the server). A linear layer
copies its weight to fp32, block by block into one reusable buffer, while it runs and
again in backward (`Float32Blocks`, through `livetrain.train.linear`), so no fp32 copy of
the model is kept; other operations that meet an fp32 activation and a half-precision
weight (a norm's) compute on an fp32 copy of it. Gradients reach the bf16 parameters
rounded to bf16 once.

`LIVETRAIN_FLOAT32_COMPUTE` overrides the choice: `1` always (for a half-precision model
on CPU), `0` never, unset or `auto` by the CPU's features.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from livetrain.train.linear import computing_linears

__all__ = ["Float32Compute", "float32_compute_needed", "model_compute"]

ENV = "LIVETRAIN_FLOAT32_COMPUTE"
_HALF = (torch.bfloat16, torch.float16)
# The most of a weight copied to fp32 at once (a 576 x 1536 projection is 3.5 MB).
_BLOCK_BYTES = 16 << 20
# Dunder operators that are not in place but do not promote mixed dtypes themselves.
_NOT_IN_PLACE = {"__matmul__", "__rmatmul__"}


def _is_half(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in _HALF


def _is_float32(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


def _upcast(value: Any) -> Any:
    if _is_half(value):
        return value.float()
    if isinstance(value, (list, tuple)) and any(_is_half(v) for v in value):
        return type(value)(v.float() if _is_half(v) else v for v in value)
    return value


class _Scratch:
    """One reusable fp32 buffer for weight blocks (a fresh copy per layer would leave the
    freed copies in the process's heap)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def block(self, rows: int, cols: int) -> torch.Tensor:
        """A [rows, cols] fp32 view of the buffer (its contents are whatever was last put there)."""
        if self._buffer is None or self._buffer.numel() < rows * cols:
            self._buffer = torch.empty(max(rows * cols, _BLOCK_BYTES // 4))
        return self._buffer[:rows * cols].view(rows, cols)


class Float32Blocks:
    """A `LinearCompute` for fp32 input ``x`` [..., in] and a half-precision ``weight``
    [out, in] / ``bias`` [out]: every product in fp32, on copies of at most _BLOCK_BYTES of
    the weight's rows at a time, made in one scratch buffer."""

    def __init__(self) -> None:
        self._scratch = _Scratch()

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return _is_float32(x) and _is_half(weight)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        blocks = list(_row_blocks(weight))
        if len(blocks) == 1:
            return F.linear(x, self._copy(weight, blocks[0]), None if bias is None else bias.float())
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for rows in blocks:
            out[..., rows] = F.linear(x, self._copy(weight, rows), None if bias is None else bias[rows].float())
        return out

    def input_grad(self, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        grad_x = None
        for rows in _row_blocks(weight):
            part = grad_out[..., rows] @ self._copy(weight, rows)  # [..., in]
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x

    def weight_grad(self, grad_rows: torch.Tensor, input_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        grad_w = torch.empty_like(weight)
        for rows in _row_blocks(weight):  # each block's fp32 gradient, then rounded into the weight's dtype
            block = self._scratch.block(rows.stop - rows.start, weight.shape[1])
            grad_w[rows] = torch.mm(grad_rows[:, rows].t(), input_rows, out=block)
        return grad_w

    def _copy(self, weight: torch.Tensor, rows: slice) -> torch.Tensor:
        """An fp32 copy of ``weight[rows]`` in the scratch buffer."""
        return self._scratch.block(rows.stop - rows.start, weight.shape[1]).copy_(weight[rows])


def _row_blocks(weight: torch.Tensor) -> Iterator[slice]:
    """Slices of `weight`'s rows whose fp32 copies take at most _BLOCK_BYTES."""
    rows = max(1, _BLOCK_BYTES // (4 * weight.shape[1]))
    return (slice(start, min(start + rows, weight.shape[0])) for start in range(0, weight.shape[0], rows))


class Float32Compute(TorchFunctionMode):
    """Within it, a half-precision model computes in fp32:

    * an embedding lookup returns fp32 rows (the hidden states are fp32 from the start);
    * a linear layer on fp32 input computes in fp32 (`Float32Blocks`, through
      `livetrain.train.linear`, which this mode leaves every linear layer to);
    * any other operation given both fp32 and half-precision tensors (a norm's weight, a
      convolution's) runs on fp32 copies of the half-precision ones.

    In-place operations and ``out=`` calls are left alone: a write into a bf16 tensor (a
    cache buffer) stays a write into that tensor, rounded to its dtype.
    """

    def __init__(self) -> None:
        super().__init__()
        self._blocks = Float32Blocks()
        self._linears = contextlib.ExitStack()

    def __enter__(self) -> "Float32Compute":
        self._linears.enter_context(computing_linears(self._blocks))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._linears.close()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            return func(*args, **kwargs).float()
        name = getattr(func, "__name__", "")
        in_place = name.endswith("_") and name not in _NOT_IN_PLACE
        if func is not F.linear and not in_place and "out" not in kwargs:
            values = [*args, *kwargs.values()]
            flat = [v for value in values for v in (value if isinstance(value, (list, tuple)) else (value,))]
            if any(_is_float32(v) for v in flat) and any(_is_half(v) for v in flat):
                args = tuple(_upcast(a) for a in args)
                kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def float32_compute_needed(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model of `dtype` on `device` should compute in fp32: half precision on a
    CPU without native matrix units for it (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16)."""
    if dtype not in _HALF or device.type != "cpu":
        return False
    choice = os.environ.get(ENV, "auto").strip().lower()
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"{ENV} must be auto, 0 or 1, got {choice!r}")
    if choice != "auto":
        return choice == "1"
    if dtype == torch.bfloat16:
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return not torch.cpu._is_amx_fp16_supported()


def model_compute(model: torch.nn.Module) -> ContextManager[Any]:
    """The context a training forward of `model` runs in: `Float32Compute` where
    `float32_compute_needed` says so for its weights, else nothing."""
    weight = model.get_input_embeddings().weight
    if float32_compute_needed(weight.dtype, weight.device):
        return Float32Compute()
    return contextlib.nullcontext()
