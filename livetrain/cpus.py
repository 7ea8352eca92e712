"""CPU cores: the list syntax, and how `livetrain serve` shares the cores between vLLM and the trainer.

vLLM's CPU worker binds one OpenMP thread to each core it is given. By default
`livetrain serve` gives vLLM every core and runs the trainer's one thread beside it
(at a lower priority); with ``trainer_cores`` N > 0 the trainer gets the last N cores to
itself and vLLM's OpenMP threads the others (docs/benchmarks.md measures both).
"""

from __future__ import annotations

import os
from typing import Iterable


class CoreSplitError(ValueError):
    """The cores cannot be shared as asked (e.g. the trainer would take every core)."""


def parse_cpus(text: str) -> set[int]:
    """Cores in a list such as "0-3,6" (the syntax of taskset and vLLM's VLLM_CPU_OMP_THREADS_BIND)."""
    cores: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def format_cpus(cores: Iterable[int]) -> str:
    """The inverse of `parse_cpus`: "0,2,5" (plain numbers, which both syntaxes accept)."""
    return ",".join(str(core) for core in sorted(cores))


def split_cores(trainer_cores: int, available: Iterable[int] | None = None) -> tuple[set[int], set[int]]:
    """``(vLLM's cores, the trainer's cores)`` out of ``available`` (default: this process's).

    ``trainer_cores`` 0: both get every core (shared). N > 0: the trainer takes the last N
    cores and vLLM the rest; with one core available both share it. Raises CoreSplitError
    when the split would leave vLLM no core.
    """
    cores = sorted(os.sched_getaffinity(0) if available is None else available)
    if trainer_cores < 0:
        raise CoreSplitError(f"the number of trainer cores cannot be negative ({trainer_cores})")
    if trainer_cores == 0 or len(cores) == 1:
        return set(cores), set(cores)
    if trainer_cores >= len(cores):
        raise CoreSplitError(f"{trainer_cores} trainer cores leave vLLM none of the {len(cores)} cores "
                             f"available ({format_cpus(cores)})")
    return set(cores[:-trainer_cores]), set(cores[-trainer_cores:])
