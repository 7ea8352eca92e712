"""One vocabulary for tensor dtypes.

A dtype's name is torch's (``bfloat16``: as in ``config.json``'s ``torch_dtype``, the
shared copy's manifest and the command line); safetensors headers use their own codes
(``BF16``). Both map to the same torch dtypes here.
"""

from __future__ import annotations

import torch

# safetensors code -> torch dtype
_SAFETENSORS = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class UnknownDtype(ValueError):
    """A dtype name or code that livetrain does not know."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of ``dtype``: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (``"bfloat16"``)."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise UnknownDtype(f"unknown dtype {name!r}")
    return dtype


def dtype_from_safetensors(code: str) -> torch.dtype:
    """The torch dtype of a safetensors header's dtype code (``"BF16"``)."""
    try:
        return _SAFETENSORS[code]
    except KeyError:
        raise UnknownDtype(f"unknown safetensors dtype {code!r}") from None
