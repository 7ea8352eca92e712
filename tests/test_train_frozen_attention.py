"""The continuation's attention over a frozen context: SDPA's outputs and gradients, no
gradient for the context's keys, and the model's own attention restored afterwards."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

import livetrain.train.frozen_attention as frozen_attention
from livetrain.train.frozen_context import continuation_logits, prefill
from livetrain.train.losses import token_logprobs
from tests.test_train_frozen_context import IDS, MODELS, P, grads


def sdpa_reference(query, key, value, mask):
    """SDPA on keys/values repeated per query head: query [B, H, T, D] -> [B, T, H, D]."""
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=query.shape[-1] ** -0.5)
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads, kv_heads, context, new, window, block_bytes", [
    (9, 3, 200, 16, None, None),        # grouped queries, short continuation: probabilities kept
    (9, 3, 100, 80, None, 9 * 8 * 180 * 7),  # long continuation: recomputed, in blocks of 7 queries
    (4, 4, 50, 12, None, None),         # no grouped queries: recomputed
    (9, 3, 60, 16, 10, None),           # sliding window: the mask hides part of the context
])
def test_attention_equals_sdpa_and_gives_the_context_no_gradient(monkeypatch, heads, kv_heads, context, new,
                                                                  window, block_bytes):
    if block_bytes is not None:
        monkeypatch.setattr(frozen_attention, "_BLOCK_BYTES", block_bytes)
    torch.manual_seed(0)
    d, s = 16, context + new
    query = torch.randn(1, heads, new, d, requires_grad=True)
    keys = torch.randn(1, kv_heads, s, d, requires_grad=True)
    values = torch.randn(1, kv_heads, s, d, requires_grad=True)
    visible = torch.arange(s) <= torch.arange(context, s)[:, None]
    if window is not None:
        visible &= torch.arange(s) > torch.arange(context, s)[:, None] - window
    mask = visible.view(1, 1, new, s)
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv_heads)

    got, _ = frozen_attention._attention(module, query, keys, values, mask, scaling=d ** -0.5)
    want = sdpa_reference(query, keys, values, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)

    grad_out = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (query, keys, values), grad_out)
    want_grads = torch.autograd.grad(want, (query, keys, values), grad_out)
    torch.testing.assert_close(got_grads[0], want_grads[0], atol=1e-6, rtol=1e-5)
    for got_g, want_g in zip(got_grads[1:], want_grads[1:]):  # keys, values
        torch.testing.assert_close(got_g[:, :, context:], want_g[:, :, context:], atol=1e-6, rtol=1e-5)
        assert torch.count_nonzero(got_g[:, :, :context]) == 0


def test_sdpa_none_mask_means_causal_up_to_the_last_key():
    torch.manual_seed(0)
    query, keys, values = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=2)
    mask = (torch.arange(12) <= torch.arange(7, 12)[:, None]).view(1, 1, 5, 12)
    with torch.enable_grad():
        got, _ = frozen_attention._attention(module, query.requires_grad_(), keys, values, None, scaling=8 ** -0.5)
    want, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=8 ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_continuation_with_grad_uses_it_and_matches_full_forward(monkeypatch, arch):
    model = MODELS[arch]()
    calls = []
    apply = frozen_attention._FrozenPrefixAttention.apply
    monkeypatch.setattr(frozen_attention._FrozenPrefixAttention, "apply",
                        lambda *args: calls.append(1) or apply(*args))
    frozen = prefill(model, IDS[:P])
    logits = continuation_logits(model, frozen, IDS[P:-1])
    loss = -token_logprobs(logits, IDS[P + 1:]).mean()
    loss.backward()
    got = grads(model)
    assert calls, "the frozen-context attention was not used"
    assert model.config.get_text_config(decoder=True)._attn_implementation == "sdpa"

    with torch.no_grad():
        full = model(input_ids=IDS[None]).logits[0, P:-1].float()
    torch.testing.assert_close(logits.detach(), full, atol=1e-5, rtol=1e-4)
    # Reference gradient: the same continuation with transformers' SDPA throughout.
    out = model(input_ids=IDS[P:-1].view(1, -1), past_key_values=frozen.fork(), use_cache=True)
    (-token_logprobs(out.logits[0].float(), IDS[P + 1:]).mean()).backward()
    want = grads(model)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_model_attention_is_restored_when_the_forward_fails():
    model = MODELS["llama"]()
    model.model.layers[1].register_forward_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        continuation_logits(model, prefill(model, IDS[:P]), IDS[P:])
    assert model.config._attn_implementation == "sdpa"
