"""What the server benchmarks share: the default model, copied fresh for every run."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from livetrain.default_model import init_default

REPO = Path(__file__).resolve().parents[1]


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "smollm2-135m-bf16",
                        help="the default model's directory (built there, bf16, if missing)")


def fresh_model_copy(base: Path, name: str) -> Path:
    """``.cache/<name>/model``: a new copy of the default model at ``base`` (built if
    missing), without livetrain state, so every run starts from the same weights."""
    base_model = init_default(base, dtype=torch.bfloat16)
    work = REPO / ".cache" / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base_model, work / "model", ignore=shutil.ignore_patterns(".livetrain"))
    return work / "model"
