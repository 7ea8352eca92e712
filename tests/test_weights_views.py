"""Layouts and Hugging Face views of vLLM-shaped tensors, on tiny models (no vLLM)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from livetrain.weights import (Layout, LayoutError, ParamLayout, ParamSlice, SharedCopyError, create_shared_copy,
                               hf_views, model_on_views, open_shared_copy, remove_shared_copy)
from tests.tiny_models import build_tiny_model
from tests.vllm_layouts import expected_layout, pack_like_vllm

ARCHS = ["llama", "qwen2", "qwen3"]


def shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    start = base.untyped_storage().data_ptr()
    return view.untyped_storage().data_ptr() == start and view.data_ptr() >= start


def reference_and_shared(arch: str, tie: bool = True):
    reference = build_tiny_model(arch, tie_word_embeddings=tie)
    layout = expected_layout(reference)
    packed = pack_like_vllm(layout, dict(reference.state_dict()))
    model = model_on_views(reference.config, layout, packed)
    return reference, layout, packed, model


def test_layout_round_trips_as_json():
    layout = expected_layout(build_tiny_model("qwen2"))
    assert Layout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


def test_qkv_and_gate_up_are_packed_in_vllm_order():
    layout = expected_layout(build_tiny_model("qwen2"))
    qkv = layout.params["model.layers.0.self_attn.qkv_proj.weight"]
    assert [s.hf_name.split(".")[-2] for s in qkv.slices] == ["q_proj", "k_proj", "v_proj"]
    assert [s.rows for s in qkv.slices] == [(0, 64), (64, 96), (96, 128)]
    assert "model.layers.0.self_attn.qkv_proj.bias" in layout.params
    gate_up = layout.params["model.layers.1.mlp.gate_up_proj.weight"]
    assert [s.rows for s in gate_up.slices] == [(0, 128), (128, 256)]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_is_a_view_of_the_shared_tensors(arch):
    reference, layout, packed, model = reference_and_shared(arch)
    views = dict(model.named_parameters(remove_duplicate=False))
    for hf_name, param in views.items():
        owner = packed[layout.owner_of(hf_name)]
        assert shares_storage(param, owner), hf_name
        torch.testing.assert_close(param.detach(), reference.get_parameter(hf_name).detach(), rtol=0, atol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # No parameter memory of its own: every byte lives in the vLLM-shaped tensors.
    shared_ptrs = {t.untyped_storage().data_ptr() for t in packed.values()}
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} <= shared_ptrs


@pytest.mark.parametrize("arch", ARCHS)
def test_views_compute_the_same_logits(arch):
    reference, _, _, model = reference_and_shared(arch)
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [True, False])
def test_training_step_through_views_matches_plain_model(arch, tie):
    reference, layout, packed, model = reference_and_shared(arch, tie)
    padding_before = packed["model.embed_tokens.weight"][reference.config.vocab_size:].clone()
    ids = torch.tensor([[1, 5, 9, 200, 3000, 7]])
    for m in (reference, model):
        m.train()
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m(ids, labels=ids).loss.backward()
        optimizer.step()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(model.get_parameter(name).detach(), param.detach(), rtol=0, atol=0)
    # The vLLM-shaped tensors hold the new weights in vLLM's rows; padding rows are untouched.
    repacked = pack_like_vllm(layout, dict(reference.state_dict()))
    for name, tensor in packed.items():
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            rows = reference.config.vocab_size
            torch.testing.assert_close(tensor[:rows], repacked[name][:rows], rtol=0, atol=0)
        else:
            torch.testing.assert_close(tensor, repacked[name], rtol=0, atol=0)
    assert torch.equal(packed["model.embed_tokens.weight"][reference.config.vocab_size:], padding_before)


def test_refresh_unit_is_the_whole_vllm_parameter():
    layout = expected_layout(build_tiny_model("qwen2"))
    assert layout.params_to_refresh(["model.layers.1.self_attn.k_proj.bias", "model.layers.0.mlp.up_proj.weight",
                                     "model.layers.0.self_attn.q_proj.weight"]) == [
        "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
        "model.layers.1.self_attn.qkv_proj.bias"]
    assert layout.params_to_refresh(["lm_head.weight"]) == ["model.embed_tokens.weight"]
    with pytest.raises(LayoutError):
        layout.params_to_refresh(["model.layers.9.self_attn.q_proj.weight"])


def test_inconsistent_layouts_are_refused():
    with pytest.raises(LayoutError):
        ParamLayout("w", (4, 2), "float32", (ParamSlice("a", (0, 3), (0, 3)), ParamSlice("b", (2, 4), (0, 2))))
    with pytest.raises(LayoutError):
        ParamLayout("w", (4, 2), "float32", (ParamSlice("a", (0, 5), (0, 5)),))
    layout = expected_layout(build_tiny_model("llama"))
    tensors = pack_like_vllm(layout, dict(build_tiny_model("llama").state_dict()))
    tensors["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(LayoutError):
        hf_views(layout, tensors)


def test_shared_copy_is_private_shared_memory_seen_by_another_process(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen3", dtype=torch.bfloat16)
    reference = build_tiny_model("qwen3").to(torch.bfloat16)
    layout = expected_layout(reference)
    directory = f"/dev/shm/livetrain-test-{os.getpid()}"
    try:
        handles = create_shared_copy(model_dir, layout, directory)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert all(stat.S_IMODE(os.stat(h.path).st_mode) == 0o600 for h in handles.values())
        with pytest.raises(SharedCopyError):
            create_shared_copy(model_dir, layout, directory)
        opened_layout, tensors = open_shared_copy(directory)
        assert opened_layout == layout
        expected = pack_like_vllm(layout, {k: v for k, v in reference.state_dict().items()})
        for name, tensor in tensors.items():
            assert tensor.dtype == torch.bfloat16
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
        qkv = "model.layers.0.self_attn.qkv_proj.weight"
        script = (f"from livetrain.weights import open_shared_copy\n"
                  f"_, t = open_shared_copy({directory!r})\n"
                  f"t[{qkv!r}][5].fill_(3.0)\n")
        subprocess.run([sys.executable, "-c", script], check=True)
        assert torch.all(tensors[qkv][5] == 3.0)  # written by the other process, seen here
    finally:
        remove_shared_copy(directory)
    assert not os.path.exists(directory)
