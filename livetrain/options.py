"""Options shared across livetrain's processes, in one place, with their defaults.

`TrainerOptions` (how the trainer trains) travels from the command line (`livetrain
serve`) through `livetrain.serve` and the training worker's own command line
(`to_argv`, `from_args`) to the training session. A leaf: it imports nothing else from
livetrain, so vLLM's plugin reads the default train modules here without importing the
trainer.
"""

from __future__ import annotations

import argparse
import dataclasses

# Context-frozen training's natural target is W_q (what the continuation looks for in
# the frozen context); k, v and o come with it because vLLM refreshes q|k|v as one
# packed parameter anyway and o_proj lets a step write into the residual stream.
# Together they are ~20 % of a small Llama's bytes, so checkpoint syncs stay small.
# A regex searched in module names (and, unanchored, in tensor names alike).
DEFAULT_TRAIN_MODULES = r"self_attn\.(q|k|v|o)_proj"
OPTIMIZERS = ("apollo-mini", "apollo", "adamw")
# APOLLO scales its update to AdamW's size (alpha = sqrt(k / r)), so one lr fits all three.
# 3e-4 is what teaches the behaviour suite from 16 examples in 2 epochs (docs/teaching.md).
DEFAULT_LR = 3e-4
# Adam's first steps divide by second moments estimated from one or two gradients, so
# each moves every trained weight by about lr whatever its gradient: at 3e-4 those steps
# alone moved ordinary text's log-probs by up to 1.2 nats/token. Ramping the lr over the
# first steps of a fresh optimizer state keeps what is learned and not that damage.
DEFAULT_WARMUP_STEPS = 8
# The environment variable that may hold the admin token (serve's, and its clients').
ADMIN_TOKEN_ENV = "LIVETRAIN_ADMIN_TOKEN"


class InvalidOptions(ValueError):
    """An option's value cannot be used; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """``optimizer``: one of `OPTIMIZERS`. ``train_modules``: which weights are trained, a
    regex searched in Hugging Face parameter names. ``lr``: the default learning rate of
    a step (None: `DEFAULT_LR`). ``sync_interval_s``: write changed weights back this
    long after the last applied step. ``warmup_steps``: step n (from 1) of a fresh
    optimizer state runs at lr · min(1, n / warmup_steps) (0: no warmup).
    ``max_probe_drift``: undo a step that moves a fixed probe text's mean log-prob by
    more than this many nats per token (None: no probe).
    """

    optimizer: str = "apollo-mini"
    train_modules: str = DEFAULT_TRAIN_MODULES
    lr: float | None = None
    sync_interval_s: float = 600.0
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    max_probe_drift: float | None = 0.5

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidOptions(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not 0 < self.lr <= 1:
            raise InvalidOptions(f"the learning rate must be in (0, 1], not {self.lr}")
        if not self.sync_interval_s > 0:
            raise InvalidOptions(f"the sync interval must be a positive number of seconds, not {self.sync_interval_s}")
        if self.warmup_steps < 0:
            raise InvalidOptions(f"the warmup steps must be 0 or more, not {self.warmup_steps}")

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR if self.lr is None else self.lr

    def warmup_factor(self, steps_taken: int) -> float:
        """The lr's multiplier for the step after ``steps_taken`` steps of the optimizer state."""
        return min(1.0, (steps_taken + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The options as command-line flags (`livetrain serve`'s and the worker's)."""
        parser.add_argument("--optimizer", choices=OPTIMIZERS, default="apollo-mini", help="default: apollo-mini")
        parser.add_argument("--train-modules", metavar="REGEX", default=DEFAULT_TRAIN_MODULES,
                            help="which weights are trained, a regex on Hugging Face parameter names "
                                 "(default: the attention projections q, k, v, o)")
        parser.add_argument("--lr", type=float, help=f"default learning rate of a step (default: {DEFAULT_LR:g})")
        parser.add_argument("--sync-interval", type=float, default=600.0, metavar="SECONDS",
                            help="write changed weights back this long after the last step (default: 600)")
        parser.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS, metavar="N",
                            help="ramp the lr linearly over the first N steps of a fresh optimizer state, "
                                 f"as after a start without saved state or a rollback (default: "
                                 f"{DEFAULT_WARMUP_STEPS}; 0 turns it off)")
        parser.add_argument("--max-probe-drift", type=float, default=0.5, metavar="NATS",
                            help="undo a step that moves a fixed probe text's mean log-prob by more than "
                                 "this (default: 0.5; 0 turns the check off)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainerOptions":
        """The options from flags added by `add_arguments`."""
        return cls(optimizer=args.optimizer, train_modules=args.train_modules, lr=args.lr,
                   sync_interval_s=args.sync_interval, warmup_steps=args.warmup_steps,
                   max_probe_drift=args.max_probe_drift or None)

    def to_argv(self) -> list[str]:
        """The flags `from_args` reads back as these options."""
        argv = ["--optimizer", self.optimizer, "--train-modules", self.train_modules,
                "--sync-interval", repr(self.sync_interval_s), "--warmup-steps", str(self.warmup_steps),
                "--max-probe-drift", repr(self.max_probe_drift or 0)]
        if self.lr is not None:
            argv += ["--lr", repr(self.lr)]
        return argv
