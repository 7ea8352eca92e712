"""The training worker on the served weights: a shared copy in vLLM's layout (no vLLM here)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from livetrain.options import TrainerOptions
from livetrain.weights import create_shared_copy, open_shared_copy, remove_shared_copy
from livetrain.worker.process import WorkerProcess
from tests.session_helpers import example, wire
from tests.tiny_models import build_tiny_model
from tests.vllm_layouts import expected_layout


def test_worker_trains_the_shared_copy_in_place_and_syncs_it(tiny_model_dir):
    model_dir = tiny_model_dir("llama", dtype=torch.bfloat16)
    layout = expected_layout(build_tiny_model("llama").to(torch.bfloat16))
    shared = f"/dev/shm/livetrain-test-worker-{os.getpid()}"
    create_shared_copy(model_dir, layout, shared)
    try:
        _, tensors = open_shared_copy(shared)  # this process's own mapping of the same files
        before = {name: t.clone() for name, t in tensors.items()}
        worker = WorkerProcess.start(model_dir, TrainerOptions(lr=1e-2), shared_copy=shared, threads=1)
        try:
            result = worker.request("train", {"examples": [wire(example(0))]})
            assert result["applied"]
            assert set(layout.params_to_refresh(result["changed_tensors"])) == \
                {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("qkv_proj", "o_proj")}
        finally:
            assert worker.stop() == 0
        qkv, gate_up = "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"
        assert not torch.equal(tensors[qkv], before[qkv])  # the step wrote into the shared memory
        assert torch.equal(tensors[gate_up], before[gate_up])
        files = load_file(model_dir / "model.safetensors")  # the shutdown sync wrote what is served
        q_rows = layout.params[qkv].slices[0].rows
        assert torch.equal(files["model.layers.0.self_attn.q_proj.weight"], tensors[qkv][q_rows[0]:q_rows[1]])
    finally:
        remove_shared_copy(shared)
