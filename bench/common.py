"""What the server benchmarks share: the default model, copied fresh for every run, and
plain vLLM (without livetrain) as a reference server."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import httpx
import torch

from livetrain.default_model import init_default
from livetrain.vllm_plugin.launcher import ENTRY_MODULE, log_tail, stop_vllm

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


@contextlib.contextmanager
def plain_vllm(model_dir: Path, port: int, log: Path, vllm_args: Sequence[str],
               env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """vLLM alone on ``model_dir`` at port ``port`` (1 GiB of KV cache, as livetrain serve
    gives it), stopped on exit; it yields the process at once (`wait_until_healthy` waits
    for it). ``env``: more environment variables for vLLM (its core binding, say)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", ENTRY_MODULE, "--model", str(model_dir),
                                    "--port", str(port), *vllm_args], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop_vllm(process)


def wait_until_healthy(process: subprocess.Popen, port: int, log: Path) -> None:
    """Return once vLLM at ``port`` answers /health; raise with its log's tail if it exits first."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited:\n{log_tail(log)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
