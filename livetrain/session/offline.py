"""Offline ``livetrain train DATA.jsonl --model DIR``: train a model directory in place.

A recipe in one function: load the data with the model's own chat template, open a
:class:`TrainingSession` on the directory (lock, model, optimizer state), run the
epochs with a progress bar, write the changed weights back with a checkpoint sync (a
new generation), and return a summary. The metrics go to ``DIR/.livetrain/metrics.jsonl``.
"""

from __future__ import annotations

import os
from pathlib import Path

from livetrain.options import DEFAULT_TRAIN_MODULES, TrainerOptions
from livetrain.session.training_session import TrainingSession
from livetrain.train.data import default_loss, load_jsonl
from livetrain.train.epochs import TrainingSummary, run_epochs
from livetrain.train.step import StepOptions


def train_offline(data: str | os.PathLike, model_dir: str | os.PathLike, *, loss: str | None = None,
                  lr: float | None = None, epochs: int = 1, batch_size: int = 1,
                  optimizer: str = "apollo-mini", train_modules: str = DEFAULT_TRAIN_MODULES,
                  max_grad_norm: float | None = 1.0, dry_run: bool = False,
                  progress: bool = True) -> TrainingSummary:
    """Train ``model_dir`` on the JSONL file ``data``; returns what was done.

    ``loss``: None gives each batch its default (ORPO for preference pairs, SFT otherwise).
    ``dry_run``: compute every loss and gradient, change nothing (no update, no sync, no
    optimizer state, no metrics). Raises ``DataFormatError`` for a malformed line
    (before loading the model), ``DirectoryInUse`` if the directory is being served.
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_jsonl(data, tokenizer)
    if not examples:
        raise ValueError(f"{data} holds no training examples")
    trainer = TrainerOptions(optimizer=optimizer, train_modules=train_modules, lr=lr, max_probe_drift=None)
    with TrainingSession.open(model_dir, trainer, scheduled_sync=False, holder="livetrain train (offline)") as session:
        def step(batch):
            options = StepOptions(loss=loss or default_loss(batch), max_grad_norm=max_grad_norm, dry_run=dry_run)
            return session.train(batch, options).to_dict()

        summary = run_epochs(examples, step, epochs=epochs, batch_size=batch_size, progress=progress,
                             desc=f"{loss or default_loss(examples)} {optimizer}")
        if summary.applied:
            summary.sync = session.sync()
    return summary
