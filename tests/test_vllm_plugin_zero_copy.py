"""CPU zero-copy mode against a real vLLM: the trained layers are served straight from the shared copy."""

from __future__ import annotations

import pytest
import torch

from livetrain.weights import open_shared_copy
from livetrain.vllm_plugin.inprocess import InProcessEngine
from tests.vllm_layouts import write_vllm_tiny_model

pytestmark = pytest.mark.vllm
TRAINED = r"\.(q_proj|down_proj)\.weight$"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return write_vllm_tiny_model(tmp_path_factory.mktemp("llama") / "model", "llama", tokenizer_dir)


@pytest.fixture(scope="module")
def vllm(model_dir):
    engine = InProcessEngine(model_dir, cpu_mode="zero-copy", train_modules=TRAINED)
    yield engine
    engine.close()
    assert not engine.shm_dir.exists()  # the shared copy does not outlive its owner


def test_trained_layers_are_served_from_the_shared_copy_without_a_reload(vllm):
    assert vllm.served.zero_copy == {f"model.layers.{i}.{name}.weight" for i in range(2)
                                     for name in ("self_attn.qkv_proj", "mlp.down_proj")}
    _, shared = open_shared_copy(vllm.shm_dir)
    prompt = "The capital of France is"
    tokens, logprobs = vllm.greedy(prompt)
    down = shared["model.layers.1.mlp.down_proj.weight"]
    saved = down.clone()
    down.mul_(-40.0)  # written by "the trainer"; no reload follows
    try:
        result = vllm.run(vllm.served.refresh(["model.layers.1.mlp.down_proj.weight"]))
        assert result.params == []  # nothing to reload, only the prefix cache is reset
        assert torch.equal(vllm.served_param("model.layers.1.mlp.down_proj.weight"), down)
        assert vllm.greedy(prompt) != (tokens, logprobs)
    finally:
        down.copy_(saved)
    vllm.run(vllm.served.refresh(["model.layers.1.mlp.down_proj.weight"]))
    assert vllm.greedy(prompt) == (tokens, logprobs)


def test_untrained_layers_still_reload_in_zero_copy_mode(vllm):
    _, shared = open_shared_copy(vllm.shm_dir)
    name = "model.layers.0.self_attn.o_proj.weight"
    before = vllm.served_param(name)
    saved = shared[name].clone()
    shared[name][3] += 1.0
    try:
        assert vllm.run(vllm.served.refresh([name])).params == [name]
        assert torch.equal(vllm.served_param(name), shared[name])
    finally:
        shared[name].copy_(saved)
        vllm.run(vllm.served.refresh([name]))
    assert torch.equal(vllm.served_param(name), before)
