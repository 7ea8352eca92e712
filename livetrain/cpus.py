"""CPU cores: the list syntax, and how `livetrain serve` shares the cores between vLLM and the trainer.

By default vLLM binds its OpenMP threads exactly as it would alone (its automatic
binding) and the trainer runs one thread on any core under ``SCHED_IDLE``: it gets a
core only when vLLM's threads leave one free, so serving keeps the speed of plain vLLM
and training uses the idle time. With ``trainer_cores`` N > 0 the trainer gets the last
N cores to itself at normal priority and vLLM's OpenMP threads the others
(docs/benchmarks.md measures both).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class CoreLayout:
    """Where vLLM's OpenMP threads and the training worker's threads run.

    ``vllm_cores`` None: vLLM's own binding. ``trainer_cores`` None: one trainer thread on
    any core, scheduled only when a core would otherwise be idle (Linux ``SCHED_IDLE``);
    otherwise one thread per core of its own, at normal priority.
    """

    vllm_cores: frozenset[int] | None
    trainer_cores: frozenset[int] | None

    @property
    def trainer_idle(self) -> bool:
        return self.trainer_cores is None

    @property
    def trainer_threads(self) -> int:
        return 1 if self.trainer_cores is None else len(self.trainer_cores)

    def describe(self) -> str:
        """One line for `livetrain serve`'s start-up message."""
        vllm = "its own binding" if self.vllm_cores is None else f"cores {format_cpus(self.vllm_cores)}"
        if self.trainer_idle:
            trainer = f"{self.trainer_threads} thread on idle cycles of any core"
        else:
            trainer = f"{self.trainer_threads} thread(s) on cores {format_cpus(self.trainer_cores)}"
        return f"vLLM on {vllm}; trainer {trainer}"


def core_layout(trainer_cores: int, available: Iterable[int] | None = None) -> CoreLayout:
    """The layout for ``trainer_cores`` out of ``available`` (default: this process's cores).

    0, or a single core available: vLLM's own binding and one idle-priority trainer thread
    on any core. N > 0: the trainer takes the last N cores (N threads, normal priority) and
    vLLM the rest. Raises CoreSplitError when that would leave vLLM no core.
    """
    cores = sorted(os.sched_getaffinity(0) if available is None else available)
    if trainer_cores < 0:
        raise CoreSplitError(f"the number of trainer cores cannot be negative ({trainer_cores})")
    if trainer_cores == 0 or len(cores) == 1:
        return CoreLayout(vllm_cores=None, trainer_cores=None)
    if trainer_cores >= len(cores):
        raise CoreSplitError(f"{trainer_cores} trainer cores leave vLLM none of the {len(cores)} cores "
                             f"available ({format_cpus(cores)})")
    return CoreLayout(vllm_cores=frozenset(cores[:-trainer_cores]), trainer_cores=frozenset(cores[-trainer_cores:]))


def schedule_when_idle() -> None:
    """Put every thread of this process under Linux's ``SCHED_IDLE`` policy: it runs only
    when a core has nothing else to run (threads started afterwards inherit their creator's)."""
    for thread in _own_threads():
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))


def schedule_normally() -> None:
    """Put the threads under ``SCHED_IDLE`` back under ``SCHED_OTHER``, for the final sync:
    whoever stops the server waits for it, and on a busy machine idle cycles may not come.
    Leaving ``SCHED_IDLE`` needs CAP_SYS_NICE or an RLIMIT_NICE of at least 20 (nice 0);
    without either the sync stays on idle cycles, and the log says so."""
    for thread in _own_threads():
        try:
            if os.sched_getscheduler(thread) == os.SCHED_IDLE:
                os.sched_setscheduler(thread, os.SCHED_OTHER, os.sched_param(0))
        except ProcessLookupError:
            continue  # the thread has ended
        except PermissionError:
            log.warning("the final sync runs on idle cycles only: leaving SCHED_IDLE needs CAP_SYS_NICE or "
                        "RLIMIT_NICE >= 20 (systemd: LimitNICE=+0)")
            return


def pin_to_cores(cores: set[int]) -> None:
    """Run every thread of this process, and those started afterwards, on ``cores`` only."""
    for thread in _own_threads():
        os.sched_setaffinity(thread, cores)


def _own_threads() -> list[int]:
    """The Linux thread ids of this process's threads."""
    return [int(task) for task in os.listdir("/proc/self/task")]
