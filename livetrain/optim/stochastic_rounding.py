"""Stochastic rounding of fp32 values into bf16 weights.

bf16 keeps 8 bits of mantissa: near 1.0 its values are 2**-7 apart, so round-to-nearest
drops every update smaller than half of that, step after step, and a small learning rate
trains nothing. Rounding up with probability equal to the distance to the lower
neighbour makes the stored value right *in expectation*, so many tiny updates add up.

A bf16 number is the top 16 bits of an fp32 number. Adding uniform random bits to the
low 16 bits and then dropping them rounds the magnitude up with exactly that probability
(the sign is its own bit, so both signs round symmetrically).
"""

from __future__ import annotations

import torch

_LOW_BITS = 1 << 16
_HIGH_HALF_MASK = -_LOW_BITS  # 0xFFFF0000 as a signed int32


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Write fp32 `source` into bf16 `target` (same shape) with stochastic rounding.

    Temporary memory: one int32 tensor of `source`'s shape (the random bits, reused for
    the result). `generator` (on `source`'s device) makes the rounding reproducible.
    Returns `target`.
    """
    if target.dtype != torch.bfloat16 or source.dtype != torch.float32:
        raise TypeError(f"stochastic rounding writes float32 into bfloat16, "
                        f"got {source.dtype} into {target.dtype}")
    if target.shape != source.shape:
        raise ValueError(f"shape mismatch: {tuple(source.shape)} into {tuple(target.shape)}")
    bits = torch.randint(0, _LOW_BITS, source.shape, dtype=torch.int32, device=source.device,
                         generator=generator)
    bits.add_(source.contiguous().view(torch.int32)).bitwise_and_(_HIGH_HALF_MASK)
    # The low 16 bits are now zero: the cast to bf16 is exact.
    return target.copy_(bits.view(torch.float32))
