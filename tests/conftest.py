"""Shared fixtures: tiny random model directories (fast) and the real default model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# Built once and reused across test runs (init_default is idempotent).
CACHE = Path(os.environ.get("LIVETRAIN_TEST_CACHE", REPO / ".cache"))

from livetrain.procfs import mapped_shm_files  # noqa: E402
from tests.tiny_models import TINY_ARCHS, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct, bf16), built once per machine."""
    from livetrain.default_model import init_default

    return init_default(CACHE / "smollm2-135m-bf16", dtype=torch.bfloat16, progress=False)


@pytest.fixture(scope="session")
def tokenizer_dir(default_model_dir: Path, tmp_path_factory) -> Path:
    """The default model's tokenizer files alone (a real chat template)."""
    out = tmp_path_factory.mktemp("tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_model_dir / name, out / name)
    return out


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tokenizer_dir: Path):
    """Factory: a tiny randomly initialised model directory, built in about a second.

    `tiny_model_dir(arch="llama"|"qwen2"|"qwen3", dtype=torch.float32, num_layers=2,
    tie_word_embeddings=True, seed=0) -> Path`. Each has config.json, model.safetensors
    and the default model's tokenizer (vocabulary 49152, hidden size 64).
    """
    count = 0

    def make(arch: str = "llama", dtype: torch.dtype = torch.float32, num_layers: int = 2,
             tie_word_embeddings: bool = True, seed: int = 0) -> Path:
        nonlocal count
        if arch not in TINY_ARCHS:
            raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(TINY_ARCHS)}")
        count += 1
        out = tmp_path / f"tiny-{arch}-{count}"
        write_tiny_model(out, arch, dtype=dtype, num_layers=num_layers,
                         tie_word_embeddings=tie_word_embeddings, seed=seed)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(tokenizer_dir / name, out / name)
        return out

    return make


def _vllm_segments() -> set[str]:
    """vLLM's multiprocessing shared memory and semaphores in /dev/shm."""
    return {p for pattern in ("psm_*", "sem.mp-*") for p in map(str, Path("/dev/shm").glob(pattern))}


@pytest.fixture
def killed_vllm_segments_removed():
    """Remove what vLLM processes SIGKILLed by the test left in /dev/shm (they cannot clean
    up): segments that are new since the test began and mapped by no live process."""
    before = _vllm_segments()
    yield
    for path in _vllm_segments() - before - mapped_shm_files():
        Path(path).unlink(missing_ok=True)
