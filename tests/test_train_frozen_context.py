"""The context-frozen forward pass: same logits as a full forward, gradient everywhere the
continuation reaches but not through the context, frozen state never written."""

from __future__ import annotations

import pytest
import torch
import transformers

from livetrain.train.frozen_context import continuation_logits, prefill
from livetrain.train.losses import token_logprobs
from tests.tiny_models import build_tiny_model

torch.manual_seed(0)
IDS = torch.randint(3, 1000, (40,))
P = 30  # frozen prefix length: context = IDS[:P + 1], continuation = IDS[P + 1:]


def tiny_hybrid() -> torch.nn.Module:
    """A tiny Qwen3.5 (Gated-DeltaNet linear attention + full attention layers)."""
    config = transformers.Qwen3_5TextConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.Qwen3_5ForCausalLM(config).eval()


MODELS = {"llama": lambda: build_tiny_model("llama"), "qwen3": lambda: build_tiny_model("qwen3"),
          "qwen3_5-hybrid": tiny_hybrid}


def frozen_loss(model, ids=IDS, p=P) -> torch.Tensor:
    frozen = prefill(model, ids[:p])
    logits = continuation_logits(model, frozen, ids[p:-1])
    return -token_logprobs(logits, ids[p + 1:]).mean()


def full_loss(model, ids=IDS, p=P) -> torch.Tensor:
    logits = model(input_ids=ids[None]).logits[0, p:-1]
    return -token_logprobs(logits, ids[p + 1:]).mean()


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def state_tensors(frozen) -> list[torch.Tensor]:
    out = []
    for layer in frozen.cache.layers:
        out += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        for name in ("conv_states", "recurrent_states"):
            out += [t for t in getattr(layer, name, {}).values() if t is not None]
    return out


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_continuation_on_frozen_context_has_full_forward_logits(arch):
    model = MODELS[arch]()
    with torch.no_grad():
        frozen = continuation_logits(model, prefill(model, IDS[:P]), IDS[P:])
        full = model(input_ids=IDS[None]).logits[0, P:].float()
    torch.testing.assert_close(frozen, full, atol=1e-5, rtol=1e-4)


def test_gradient_reaches_q_proj_and_equals_detached_context_kv_reference():
    model = build_tiny_model("llama")
    frozen_loss(model).backward()
    frozen = grads(model)
    assert all(frozen[f"model.layers.{i}.self_attn.q_proj.weight"].abs().sum() > 0 for i in range(2))

    # Reference: one full forward in which the context's keys and values are detached.
    def detach_context(module, args, out):
        return torch.cat([out[:, :P].detach(), out[:, P:]], dim=1)

    hooks = [layer.self_attn.k_proj.register_forward_hook(detach_context) for layer in model.model.layers]
    hooks += [layer.self_attn.v_proj.register_forward_hook(detach_context) for layer in model.model.layers]
    full_loss(model).backward()
    reference = grads(model)
    for h in hooks:
        h.remove()
    full_loss(model).backward()
    full = grads(model)

    assert frozen.keys() == reference.keys()
    for name in frozen:
        torch.testing.assert_close(frozen[name], reference[name], atol=1e-6, rtol=1e-4, msg=name)
    k0 = "model.layers.0.self_attn.k_proj.weight"
    assert (frozen[k0] - full[k0]).norm() > 0.1 * full[k0].norm()  # full backprop differs


def test_hybrid_model_trains_on_frozen_context_without_writing_it():
    model = tiny_hybrid()
    frozen = prefill(model, IDS[:P])
    before = [t.clone() for t in state_tensors(frozen)]
    for length in (9, 1):  # one token: the path whose fused kernel writes the state in place
        logits = continuation_logits(model, frozen, IDS[P:P + length])
        (-token_logprobs(logits, IDS[P + 1:P + 1 + length]).mean()).backward()
        g = grads(model)
        assert g["model.layers.0.linear_attn.in_proj_qkv.weight"].abs().sum() > 0
        assert all(torch.isfinite(v).all() for v in g.values())
    assert all(torch.equal(a, b) for a, b in zip(before, state_tensors(frozen)))


@pytest.mark.parametrize("arch", ["llama", "qwen3_5-hybrid"])
def test_frozen_context_reused_by_two_continuations_gives_same_result(arch):
    model = MODELS[arch]()
    frozen = prefill(model, IDS[:P])
    with torch.no_grad():
        first = continuation_logits(model, frozen, IDS[P:])
        continuation_logits(model, frozen, IDS[P:P + 4].flip(0))  # another answer in between
        again = continuation_logits(model, frozen, IDS[P:])
    assert torch.equal(first, again)


@pytest.mark.parametrize("arch", ["llama", "qwen3_5-hybrid"])
def test_extended_frozen_context_equals_prefill_of_whole_prefix(arch):
    model = MODELS[arch]()
    base = prefill(model, IDS[:20])
    base_state = [t.clone() for t in state_tensors(base)]
    extended = prefill(model, IDS[20:P], base=base)
    assert extended.length == P
    with torch.no_grad():
        got = continuation_logits(model, extended, IDS[P:])
        want = continuation_logits(model, prefill(model, IDS[:P]), IDS[P:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(base_state, state_tensors(base)))


def test_hybrid_preference_pair_shares_one_context_without_corrupting_it():
    from livetrain.train import PreferenceExample, StepOptions, train_step
    from livetrain.train.losses import orpo_loss

    model = tiny_hybrid()
    context, chosen, rejected = IDS[:P + 1].tolist(), IDS[P + 1:].tolist(), IDS[P + 1:].flip(0).tolist()

    def full_logprobs(answer):
        ids = torch.tensor(context + answer)
        with torch.no_grad():
            return token_logprobs(model(input_ids=ids[None]).logits[0, len(context) - 1:-1], torch.tensor(answer))

    want, _ = orpo_loss(full_logprobs(chosen), full_logprobs(rejected), 0.1)
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=1e-3),
                        [PreferenceExample(tuple(context), tuple(chosen), tuple(rejected))], StepOptions(loss="orpo"))
    assert result.applied
    assert result.loss == pytest.approx(want.item(), rel=1e-4)
