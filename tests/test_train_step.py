"""The guarded training step: SFT/ORPO/DPO, the shared context of a preference pair, guards."""

from __future__ import annotations

import pytest
import torch

from livetrain.train import (InvalidExampleError, PreferenceExample, SFTExample, StepOptions,
                             continuation_logprobs, train_step)
from livetrain.train.losses import dpo_loss, orpo_loss, token_logprobs
from tests.tiny_models import build_tiny_model

torch.manual_seed(0)
CTX = tuple(torch.randint(3, 1000, (24,)).tolist())
ANS = tuple(torch.randint(3, 1000, (6,)).tolist())
BAD = tuple(torch.randint(3, 1000, (5,)).tolist())


@pytest.fixture
def model():
    return build_tiny_model("llama")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bit_identical(model, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def full_logprobs(model, context, answer) -> torch.Tensor:
    """Reference: one full forward of context + answer."""
    ids = torch.tensor(context + answer)
    logits = model(input_ids=ids[None]).logits[0, len(context) - 1:-1]
    return token_logprobs(logits, torch.tensor(answer))


class ForwardCounter:
    """Counts the model's forward calls and the tokens each one processed."""

    def __init__(self, model):
        self.lengths: list[int] = []
        model.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.lengths.append(kwargs["input_ids"].shape[1])


def test_sft_step_updates_weights_in_place_and_lowers_loss(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    q = model.model.layers[0].self_attn.q_proj.weight
    q_before, q_storage = q.detach().clone(), q.data_ptr()
    results = [train_step(model, opt, [SFTExample(CTX, ANS)], StepOptions(measure_update=True)) for _ in range(5)]
    assert all(r.applied and r.reason is None for r in results)
    assert results[-1].loss < results[0].loss
    assert results[0].tokens == len(ANS) and results[0].update_norm > 0
    assert q.data_ptr() == q_storage and not torch.equal(q.detach(), q_before)


def test_step_loss_is_token_weighted_mean_nll_of_batch(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = [SFTExample(CTX, ANS), SFTExample(CTX[:10], BAD)]
    with torch.no_grad():
        nll = -(full_logprobs(model, CTX, ANS).sum() + full_logprobs(model, CTX[:10], BAD).sum())
    result = train_step(model, opt, batch, StepOptions(dry_run=True))
    assert result.loss == pytest.approx((nll / (len(ANS) + len(BAD))).item(), rel=1e-5)


def test_preference_pair_runs_context_once_and_matches_separate_forwards(model):
    pair = PreferenceExample(CTX, ANS, BAD)
    with torch.no_grad():
        want, _ = orpo_loss(full_logprobs(model, CTX, ANS), full_logprobs(model, CTX, BAD), 0.1)
    counter = ForwardCounter(model)
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [pair],
                        StepOptions(loss="orpo", orpo_lambda=0.1, dry_run=True))
    # context[:-1] once, then each answer (with the context's last token) on its own fork
    assert counter.lengths == [len(CTX) - 1, len(ANS), len(BAD)]
    assert result.loss == pytest.approx(want.item(), rel=1e-5)
    assert "log_odds_ratio" in result.metrics


def test_dpo_reference_defaults_to_current_weights_or_is_taken_from_example(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    own = train_step(model, opt, [PreferenceExample(CTX, ANS, BAD)], StepOptions(loss="dpo", dry_run=True))
    assert own.loss == pytest.approx(0.6931472, rel=1e-6)  # policy == reference: -log σ(0)
    with torch.no_grad():
        chosen, rejected = full_logprobs(model, CTX, ANS), full_logprobs(model, CTX, BAD)
        want, _ = dpo_loss(chosen, rejected, -50.0, -40.0, beta=0.5)
    given = train_step(model, opt, [PreferenceExample(CTX, ANS, BAD, -50.0, -40.0)],
                       StepOptions(loss="dpo", dpo_beta=0.5, dry_run=True))
    assert given.loss == pytest.approx(want.item(), rel=1e-5)


def test_dpo_step_raises_chosen_over_rejected(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pair = PreferenceExample(CTX, ANS, BAD)

    def margin():
        return (continuation_logprobs(model, CTX, ANS).sum() - continuation_logprobs(model, CTX, BAD).sum()).item()

    before = margin()
    assert train_step(model, opt, [pair], StepOptions(loss="dpo")).applied
    assert margin() > before


def test_reported_grad_norm_is_the_norm_of_the_accumulated_gradients(model):
    class Recording(torch.optim.SGD):
        """Records the global norm of the gradients it steps on."""

        def step(self, closure=None):
            grads = [p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.seen = torch.cat(grads).norm().item()
            return super().step(closure)

    opt = Recording(model.parameters(), lr=1e-3)
    batch = [SFTExample(CTX, ANS), SFTExample(CTX[:10], ANS[:3]), SFTExample(CTX[5:], ANS)]
    result = train_step(model, opt, batch, StepOptions(max_grad_norm=None))
    assert result.applied and result.grad_norm == pytest.approx(opt.seen, rel=1e-5)


def test_dry_run_computes_gradients_and_applies_nothing(model):
    snap = snapshot(model)
    result = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2), [SFTExample(CTX, ANS)],
                        StepOptions(dry_run=True))
    assert not result.applied and result.reason == "dry run" and result.grad_norm > 0
    assert bit_identical(model, snap)


def test_non_finite_loss_leaves_weights_bit_identical(model):
    snap = snapshot(model)
    model.model.layers[1].register_forward_hook(lambda m, a, out: out * float("nan"))
    result = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2), [SFTExample(CTX, ANS)])
    assert not result.applied and result.reason == "non-finite loss"
    assert bit_identical(model, snap)
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_gradient_leaves_weights_bit_identical(model):
    snap = snapshot(model)
    model.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * float("inf"))
    result = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2), [SFTExample(CTX, ANS)])
    assert not result.applied and result.reason == "non-finite gradient"
    assert bit_identical(model, snap)


@pytest.mark.parametrize("example, message", [
    (SFTExample(CTX, (5, 49152)), "outside the vocabulary"),
    (SFTExample(CTX, (-1,)), "outside the vocabulary"),
    (SFTExample(CTX, ()), "continuation_ids is empty"),
    (SFTExample((), ANS), "context_ids is empty"),
    (SFTExample(CTX * 90, ANS), "over the model's context length 2048"),
    (PreferenceExample(CTX, ANS, BAD), "needs SFTExample"),
])
def test_invalid_example_is_rejected_before_any_computation(model, example, message):
    counter = ForwardCounter(model)
    snap = snapshot(model)
    with pytest.raises(InvalidExampleError, match=message):
        train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), [SFTExample(CTX, ANS), example])
    assert counter.lengths == [] and bit_identical(model, snap)


def test_max_update_norm_scales_the_update_down(model):
    snap = snapshot(model)
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=10.0), [SFTExample(CTX, ANS)],
                        StepOptions(max_grad_norm=None, max_update_norm=0.01))
    assert result.applied and result.update_norm == pytest.approx(0.01)
    change = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach() - snap[n])
                                                   for n, p in model.named_parameters()]))
    assert change.item() == pytest.approx(0.01, rel=1e-3)


def test_step_lr_applies_to_this_step_only(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    snap = snapshot(model)
    result = train_step(model, opt, [SFTExample(CTX, ANS)], StepOptions(lr=0.1, max_grad_norm=None))
    assert result.applied and not bit_identical(model, snap)
    assert opt.param_groups[0]["lr"] == 0.0


def test_max_grad_norm_clips_before_the_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    result = train_step(model, opt, [SFTExample(CTX, ANS)], StepOptions(max_grad_norm=1e-3, measure_update=True))
    assert result.grad_norm > 1e-3  # reported before clipping
    assert result.update_norm == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1: update = clipped gradient


def test_continuation_logprobs_equal_full_forward(model):
    with torch.no_grad():
        want = full_logprobs(model, CTX, ANS)
    torch.testing.assert_close(continuation_logprobs(model, CTX, ANS), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(continuation_logprobs(model, CTX[:1], ANS),
                               full_logprobs(model, CTX[:1], ANS).detach(), atol=1e-5, rtol=1e-5)


def test_apollo_step_clips_like_rescaled_gradients(model):
    """With APOLLO the clip factor goes into the optimizer's step instead of rewriting the
    gradients: the weights come out as if the gradients had been rescaled first."""
    from livetrain.optim import apollo_mini, apollo_param_groups

    class RescaledFirst:
        """The same APOLLO behind an interface the step does not recognise: it rescales
        the gradients, then calls step()."""

        def __init__(self, optimizer):
            self.optimizer, self.param_groups = optimizer, optimizer.param_groups

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none=set_to_none)

        def step(self):
            self.optimizer.step()

    reference = build_tiny_model("llama")
    reference.load_state_dict(model.state_dict())
    folded = train_step(model, apollo_mini(apollo_param_groups(model), lr=1e-2), [SFTExample(CTX, ANS)],
                        StepOptions(max_grad_norm=1e-3))
    rescaled = train_step(reference, RescaledFirst(apollo_mini(apollo_param_groups(reference), lr=1e-2)),
                          [SFTExample(CTX, ANS)], StepOptions(max_grad_norm=1e-3))
    assert folded.applied and rescaled.applied and folded.grad_norm > 1e-3
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8, msg=name)
    untouched = build_tiny_model("llama").model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, untouched)
