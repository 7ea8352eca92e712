"""End to end: vLLM with livetrain's plugin serves a model while the training worker trains
its weights through the routes; the next request sees each step; rollback restores it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from livetrain.options import TrainerOptions
from livetrain.weights import remove_shared_copy
from livetrain.worker.process import WorkerProcess, new_runtime_dir, worker_address
from tests.session_helpers import files_digest, free_port, post_json

pytestmark = pytest.mark.slow

PROMPT = [1, 504, 1345, 314, 260, 3575, 282, 4649, 30]  # token ids: vLLM takes them as the prompt




def greedy(base_url: str, model_dir: Path, n: int = 4) -> list[int]:
    out = post_json(base_url + "/v1/completions", {"model": str(model_dir), "prompt": PROMPT, "max_tokens": n,
                                              "temperature": 0, "return_token_ids": True})
    return out["choices"][0]["token_ids"]


def test_train_through_vllm_next_request_sees_it_and_rollback_restores(tmp_path, tokenizer_dir):
    from livetrain.vllm_plugin.launcher import VllmLaunch, start_vllm, stop_vllm, wait_until_ready
    from livetrain.vllm_plugin.settings import PluginSettings
    from tests.vllm_layouts import write_vllm_tiny_model

    model_dir = write_vllm_tiny_model(tmp_path / "model", "llama", tokenizer_dir)
    runtime_dir = new_runtime_dir()
    shm_dir = Path(f"/dev/shm/livetrain-e2e-{os.getpid()}")
    settings = PluginSettings(shm_dir=shm_dir, worker_address=worker_address(runtime_dir))
    launch = VllmLaunch(model_dir, settings, port=free_port(), extra_args=["--enforce-eager", "--max-model-len", "256"])
    log = tmp_path / "vllm.log"
    vllm = start_vllm(launch, log)
    worker = None
    try:
        wait_until_ready(launch, vllm, log, timeout_s=300)
        worker = WorkerProcess.start(model_dir, TrainerOptions(lr=1e-2, max_probe_drift=0), shared_copy=shm_dir,
                                     runtime_dir=runtime_dir, threads=1)
        base = launch.base_url
        before = greedy(base, model_dir)
        target = [t + 7 for t in before]
        digest = files_digest(model_dir)
        for _ in range(40):
            result = post_json(base + "/train", {"examples": [{"context_ids": PROMPT, "continuation_ids": target}]})
            assert result["applied"], result
            if greedy(base, model_dir) == target:  # the first request after the step
                break
        else:
            pytest.fail("40 steps did not make the trained continuation the greedy one")
        assert post_json(base + "/checkpoint", {})["generation"] == 1
        assert files_digest(model_dir) != digest
        rolled = post_json(base + "/rollback", {"generation": 0})
        assert rolled["weights_version"] > result["weights_version"]
        assert files_digest(model_dir) == digest
        assert greedy(base, model_dir) == before
    finally:
        if worker is not None:
            worker.stop()
        stop_vllm(vllm)
        remove_shared_copy(shm_dir)
        shutil.rmtree(runtime_dir)
