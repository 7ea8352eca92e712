"""Keep freed host memory for reuse in a process that trains.

glibc hands freed memory back to the kernel: a block over its mmap threshold is
unmapped when freed, and the top of the heap is trimmed once enough of it is free. A
training step holds every trained matrix's gradient until its optimizer step (hundreds
of MB on the default model) and frees them all at the end, so the next step takes a
page fault for every 4 KiB page of its gradients again: about 300 MB of faults per
context-cache-hit step on the default model with every decoder matrix trained in fp32,
which made those steps about 20 % slower (docs/benchmarks.md).

`retain_freed_memory` makes the process keep what it frees for reuse, as PyTorch's
caching allocator does on a GPU: between steps the resident set stays at the last
step's peak, which the process needed anyway, and later steps fault only on growth.
"""

from __future__ import annotations

import ctypes

__all__ = ["retain_freed_memory"]

# mallopt(3) parameters and glibc's ceiling on the mmap threshold on 64-bit systems
# (4 MiB * sizeof(long)): larger blocks are still mapped and unmapped one by one.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def retain_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and never trim it (process-wide).

    Returns False, changing nothing, where the C library is not glibc.
    """
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
