"""The epoch loop over a training set: batches, a progress bar, a summary.

Shared by offline ``livetrain train`` (steps run in-process) and the HTTP client's
``livetrain train --server`` (steps posted to ``/train``): ``step`` is whichever
runs one batch and returns its step result as a dict.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


@dataclasses.dataclass
class TrainingSummary:
    """What a run over a training set did."""

    steps: int = 0
    applied: int = 0
    refused: int = 0
    examples: int = 0
    tokens: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    seconds: float = 0.0
    refusals: dict[str, int] = dataclasses.field(default_factory=dict)
    sync: dict[str, Any] | None = None

    def format(self) -> str:
        """A few lines for a person at a terminal."""
        rate = self.tokens / self.seconds if self.seconds else 0.0
        loss = "n/a" if self.first_loss is None else f"{self.first_loss:.4f} -> {self.last_loss:.4f}"
        lines = [f"{self.steps} steps ({self.applied} applied) on {self.examples} examples, "
                 f"{self.tokens} tokens in {self.seconds:.1f} s ({rate:.0f} tokens/s)",
                 f"loss (first step -> last step): {loss}"]
        if self.refusals:
            lines.append("not applied: " + ", ".join(f"{n} x {why}" for why, n in self.refusals.items()))
        if self.sync is not None:
            lines.append(f"checkpoint: generation {self.sync.get('generation')}, "
                         f"{self.sync.get('bytes_written', 0) / 2**20:.1f} MiB written")
        return "\n".join(lines)


def batches(items: Sequence[T], batch_size: int) -> list[Sequence[T]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def run_epochs(examples: Sequence[T], step: Callable[[Sequence[T]], dict[str, Any]], *,
               epochs: int = 1, batch_size: int = 1, progress: bool = True,
               desc: str = "train") -> TrainingSummary:
    """Run ``step`` on every batch of ``examples``, ``epochs`` times, with a progress bar."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    summary = TrainingSummary()
    plan = batches(examples, batch_size) * epochs
    start = time.perf_counter()
    with tqdm(total=len(plan), desc=desc, unit="step", disable=not progress) as bar:
        for batch in plan:
            result = step(batch)
            summary.steps += 1
            summary.examples += len(batch)
            summary.tokens += int(result.get("tokens", 0))
            if result.get("applied"):
                summary.applied += 1
            else:
                summary.refused += 1
                reason = result.get("reason") or "unknown"
                summary.refusals[reason] = summary.refusals.get(reason, 0) + 1
            if result.get("loss") is not None:
                if summary.first_loss is None:
                    summary.first_loss = result["loss"]
                summary.last_loss = result["loss"]
            summary.seconds = time.perf_counter() - start
            bar.set_postfix(loss=f"{result.get('loss') or float('nan'):.4f}",
                            tok_s=f"{summary.tokens / max(summary.seconds, 1e-9):.0f}")
            bar.update()
    return summary
