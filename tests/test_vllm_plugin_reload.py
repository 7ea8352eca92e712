"""CPU reload mode against a real vLLM: the layout it derives, and refreshing its packed kernels
from the shared copy after a training step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from livetrain.options import TrainerOptions
from livetrain.weights import Layout, model_on_views, open_shared_copy
from livetrain.vllm_plugin.inprocess import InProcessEngine
from tests.vllm_layouts import expected_layout, write_vllm_tiny_model

pytestmark = pytest.mark.vllm
QKV0 = "model.layers.0.self_attn.qkv_proj.weight"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return write_vllm_tiny_model(tmp_path_factory.mktemp("qwen2") / "model", "qwen2", tokenizer_dir)


@pytest.fixture(scope="module")
def vllm(model_dir):
    engine = InProcessEngine(model_dir, cpu_mode="reload")
    yield engine
    engine.close()
    assert not engine.shm_dir.exists()  # the shared copy does not outlive its owner


def test_layout_derived_inside_vllm_is_the_hugging_face_packing(vllm, model_dir):
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert vllm.served.layout == expected_layout(reference)
    assert Layout.from_dict(vllm.served.weights_export["layout"]) == vllm.served.layout


def test_step_through_views_refreshes_whole_qkv_and_leaves_untrained_rows_bit_identical(vllm, model_dir):
    layout, shared = open_shared_copy(vllm.shm_dir)
    model = model_on_views(AutoConfig.from_pretrained(model_dir), layout, shared)
    before = {name: vllm.served_param(name) for name in (QKV0, "model.layers.0.self_attn.o_proj.weight",
                                                         "model.layers.0.self_attn.qkv_proj.bias")}
    q = model.model.layers[0].self_attn.q_proj.weight
    for p in model.parameters():
        p.requires_grad_(p is q)
    ids = torch.tensor([[1, 17, 4000, 250, 9]])
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD([q], lr=10.0).step()

    result = vllm.run(vllm.served.refresh(["model.layers.0.self_attn.q_proj.weight"], weights_version=1))

    assert result.params == [QKV0]  # the whole merged parameter, nothing else
    assert result.prefix_cache_reset == "reset"
    served = vllm.served_param(QKV0)
    assert torch.equal(served, shared[QKV0])  # what vLLM's packed kernel computes with is the trained copy
    assert not torch.equal(served[:128], before[QKV0][:128])  # q rows trained
    assert torch.equal(served[128:], before[QKV0][128:])  # k, v rows bit-identical
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.qkv_proj.bias"):
        assert torch.equal(vllm.served_param(name), before[name])


def test_first_request_after_refresh_sees_the_new_weights(vllm):
    _, shared = open_shared_copy(vllm.shm_dir)
    prompt = "The capital of France is"
    tokens, logprobs = vllm.greedy(prompt)
    norm = shared["model.norm.weight"]
    saved = norm.clone()
    norm.zero_()  # all logits 0: greedy decoding picks token 0 every time
    vllm.run(vllm.served.refresh(["model.norm.weight"]))
    assert vllm.greedy(prompt)[0] == [0] * len(tokens) != tokens
    norm.copy_(saved)
    vllm.run(vllm.served.refresh(["model.norm.weight"]))
    assert vllm.greedy(prompt) == (tokens, logprobs)


def test_tied_lm_head_kernel_follows_a_refreshed_embedding(vllm):
    _, shared = open_shared_copy(vllm.shm_dir)
    embed = shared["model.embed_tokens.weight"]
    saved = embed[100:110].clone()
    embed[100:110] = 0.5
    try:
        result = vllm.run(vllm.served.refresh(["lm_head.weight"]))
        assert result.params == ["model.embed_tokens.weight"]
        assert torch.equal(vllm.served_param("model.embed_tokens.weight"), embed)
        assert torch.equal(vllm.served_param("lm_head.weight"), embed)  # CPU's separate packed lm_head too
    finally:
        embed[100:110] = saved
        vllm.run(vllm.served.refresh(["model.embed_tokens.weight"]))


@pytest.mark.parametrize("consistent", [False, True])
def test_refreshes_during_a_request_keep_the_request(vllm, consistent):
    import asyncio

    async def refresh_while_generating():
        request = asyncio.ensure_future(vllm.complete("Once upon a time", 200, ignore_eos=True))
        results = []
        while not request.done():  # forward passes keep running between the weight-update calls
            results.append(await vllm.served.refresh(["model.layers.1.self_attn.q_proj.weight"],
                                                     consistent=consistent))
            await asyncio.sleep(0.01)
        tokens, _ = await request
        return results, tokens

    results, tokens = vllm.run(refresh_while_generating())
    assert len(results) > 3
    assert all(r.params == ["model.layers.1.self_attn.qkv_proj.weight"] for r in results)
    assert len(tokens) == 200  # neither aborted nor cut short
    assert {r.prefix_cache_reset for r in results} <= {"reset", "salted"}


def test_a_step_of_the_training_worker_is_what_vllm_serves_after_refresh(vllm, model_dir):
    from livetrain.worker.process import WorkerProcess

    worker = WorkerProcess.start(model_dir, TrainerOptions(optimizer="adamw", lr=1e-2, sync_interval_s=3600),
                                 shared_copy=vllm.shm_dir, threads=1)
    try:
        before = vllm.served_param(QKV0)
        result = worker.request("train", {"examples": [{"context_ids": [1, 17, 4000], "continuation_ids": [250, 9]}],
                                          "loss": "sft"}, timeout_s=300)
        assert result["applied"], result
        changed = result["changed_tensors"]
        assert "model.layers.0.self_attn.q_proj.weight" in changed
        refresh = vllm.run(vllm.served.refresh(changed, result["weights_version"]))
        assert QKV0 in refresh.params
        _, shared = open_shared_copy(vllm.shm_dir)
        served = vllm.served_param(QKV0)
        assert torch.equal(served, shared[QKV0]) and not torch.equal(served, before)
    finally:
        worker.stop(timeout_s=60)
