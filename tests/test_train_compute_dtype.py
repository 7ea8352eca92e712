"""Float32 compute for a bf16 model: the same logits and gradients as an fp32 copy of it,
gradients landing on the bf16 parameters, no fp32 weight copies kept for backward, writes
into bf16 buffers left bf16, and the choice made from the CPU's features."""

from __future__ import annotations

import copy
import contextlib

import pytest
import torch

from livetrain.optim import apollo_mini
from livetrain.train import SFTExample, train_step
from livetrain.train import compute_dtype
from livetrain.train.compute_dtype import ENV, Float32Compute, model_compute
from tests.test_train_frozen_context import IDS, MODELS, frozen_loss
from tests.tiny_models import build_tiny_model


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv(ENV, "1")


def bf16_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("block_rows", [None, 7])
def test_bf16_model_under_float32_compute_matches_its_fp32_copy(arch, block_rows, forced, monkeypatch):
    if block_rows:  # weights copied to fp32 a few rows at a time (as an LM head is)
        monkeypatch.setattr(compute_dtype, "_BLOCK_BYTES", 4 * 64 * block_rows)
    model = build_tiny_model(arch).to(torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the same weights, exactly, in fp32

    loss = frozen_loss(model)
    loss.backward()
    ref_loss = frozen_loss(reference)
    ref_loss.backward()

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    got, want = bf16_grads(model), bf16_grads(reference)
    assert set(got) == set(want) and "model.layers.0.self_attn.q_proj.weight" in got
    for name, grad in got.items():
        assert grad.dtype == torch.bfloat16, name
        expected = want[name].to(torch.bfloat16)
        if "embed_tokens" in name:
            # tied with the LM head: two bf16 gradients summed, each rounded before the sum
            torch.testing.assert_close(grad, expected, rtol=2 ** -7, atol=2 ** -7 * expected.abs().max().item())
        else:  # the fp32 gradient rounded to bf16 once (1 ulp for the order of a sum)
            torch.testing.assert_close(grad, expected, rtol=2 ** -7, atol=1e-6)


def test_without_float32_compute_a_bf16_model_computes_in_bf16(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    model = build_tiny_model("llama").to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    diff = (frozen_loss(model) - frozen_loss(reference)).abs()
    assert diff > 1e-4  # bf16 arithmetic: what float32 compute changes


def test_linear_layers_keep_their_bf16_weights_for_backward_not_fp32_copies(forced):
    model = build_tiny_model("llama").to(torch.bfloat16)
    weight_shapes = {tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2}
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        frozen_loss(model).backward()
    weights = [t for t in saved if tuple(t.shape) in weight_shapes]
    assert weights, "backward saved no weights"
    assert all(t.dtype == torch.bfloat16 for t in weights), {str(t.dtype) for t in weights}


def test_writes_into_bf16_tensors_stay_bf16_writes():
    buffer = torch.zeros(8, dtype=torch.bfloat16)
    values = torch.linspace(0, 1, 8)
    with Float32Compute():
        buffer.copy_(values)
        buffer[:2] = values[:2] * 3
        buffer.add_(values)
        summed = buffer + values  # not in place: promotes as usual
    assert buffer.dtype == torch.bfloat16
    expected = values.to(torch.bfloat16)
    expected[:2] = (values[:2] * 3).to(torch.bfloat16)
    expected = expected.add_(values)
    assert torch.equal(buffer, expected)
    assert summed.dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "qwen3_5-hybrid"])
def test_bf16_train_step_under_float32_compute_updates_the_bf16_weights_in_place(arch, forced):
    model = MODELS[arch]().to(torch.bfloat16)
    params = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    pointers = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    optimizer = apollo_mini(params, lr=1e-2)
    ids = IDS.tolist()
    result = train_step(model, optimizer, [SFTExample(tuple(ids[:30]), tuple(ids[30:]))])
    assert result.applied, result.reason
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert [p.data_ptr() for p in params] == pointers
    changed = sum(not torch.equal(a, p) for a, p in zip(before, params))
    assert changed == len(params)


@pytest.mark.parametrize("setting, native, dtype, expect", [
    (None, False, torch.bfloat16, True),    # AVX2-only CPU: bf16 emulated
    (None, True, torch.bfloat16, False),    # AVX512-BF16 / AMX
    ("auto", False, torch.bfloat16, True),
    ("0", False, torch.bfloat16, False),
    ("1", True, torch.bfloat16, True),
    ("1", False, torch.float32, False),     # an fp32 model computes in fp32 anyway
])
def test_model_compute_chooses_float32_by_cpu_features_and_setting(monkeypatch, setting, native, dtype, expect):
    if setting is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, setting)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    model = build_tiny_model("llama").to(dtype)
    context = model_compute(model)
    assert isinstance(context, Float32Compute) if expect else isinstance(context, contextlib.nullcontext)


def test_bad_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ValueError, match=ENV):
        model_compute(build_tiny_model("llama").to(torch.bfloat16))
