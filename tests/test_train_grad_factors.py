"""Weight gradients kept as factors (dY, X): the same norms, the same APOLLO step and the
same training step as with the dense gradient G = dYᵀ·X, which is never formed."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from livetrain.optim import Apollo, apollo_mini, apollo_param_groups
from livetrain.optim import grad_factors
from livetrain.optim.grad_factors import GradFactors
from livetrain.train import PreferenceExample, SFTExample, StepOptions, train_step
from livetrain.train.compute_dtype import ENV
from tests.tiny_models import build_tiny_model

torch.manual_seed(0)
CTX = tuple(torch.randint(3, 1000, (24,)).tolist())
ANSWERS = [tuple(torch.randint(3, 1000, (n,)).tolist()) for n in (5, 3)]


def recorded(shape: tuple[int, int], rows: tuple[int, ...]) -> tuple[GradFactors, torch.Tensor, torch.Tensor]:
    """A weight of `shape` with factors recorded in calls of `rows` rows each, and its dense G."""
    weight = torch.zeros(shape, requires_grad=True)
    factors = GradFactors([weight])
    dense = torch.zeros(shape)
    for n in rows:
        grad_rows, input_rows = torch.randn(n, shape[0]), torch.randn(n, shape[1])
        factors.record(weight, grad_rows, input_rows)
        dense += grad_rows.T @ input_rows
    return factors, weight, dense


@pytest.mark.parametrize("shape", [(12, 7), (5, 9)])
def test_factor_norms_equal_the_dense_gradients_norms(shape):
    factors, weight, dense = recorded(shape, (3, 2))
    assert torch.allclose(factors.norm(weight), torch.linalg.vector_norm(dense), rtol=1e-5)
    for dim in (0, 1):
        assert torch.allclose(factors.channel_norms(weight, dim), torch.linalg.vector_norm(dense, dim=dim),
                              rtol=1e-5)
    grad_rows, input_rows = factors.get(weight)
    assert grad_rows.shape == (5, shape[0]) and input_rows.shape == (5, shape[1])


def test_folding_adds_the_factors_into_a_dense_gradient():
    factors, weight, dense = recorded((6, 4), (3,))
    other = torch.randn(6, 4)
    weight.grad = other.clone()
    factors.fold_into_grads()
    assert torch.allclose(weight.grad, other + dense, atol=1e-6)
    assert factors.get(weight) is None and factors.recorded() == []


def test_factors_only_where_they_are_at_most_half_the_gradients_size():
    weight = torch.zeros(576, 1536)
    assert GradFactors.worth_it(weight, 64)
    assert not GradFactors.worth_it(weight, 256)  # 256 * 2112 > 576 * 1536 / 2


@pytest.mark.parametrize("rank,scale_type", [(1, "tensor"), (2, "channel")])
def test_apollo_step_from_factors_equals_the_step_from_the_dense_gradient(rank, scale_type):
    shapes = [(12, 7), (5, 9), (8, 8)]  # projected on columns, on rows, a tie
    torch.manual_seed(1)
    dense_params = [torch.randn(s, requires_grad=True) for s in shapes]
    initial = [p.detach().clone() for p in dense_params]
    factored_params = [p.detach().clone().requires_grad_() for p in dense_params]
    dense_opt = Apollo(dense_params, lr=1e-2, rank=rank, scale_type=scale_type)
    factored_opt = Apollo(factored_params, lr=1e-2, rank=rank, scale_type=scale_type)
    for step in range(3):
        factors = GradFactors(factored_params)
        for p, q in zip(dense_params, factored_params):
            grad_rows, input_rows = torch.randn(4, p.shape[0]), torch.randn(4, p.shape[1])
            p.grad = grad_rows.T @ input_rows
            factors.record(q, grad_rows, input_rows)
        scale = 0.5 if step == 1 else None
        dense_opt.step(grad_scale=scale)
        factored_opt.step(grad_scale=scale, grad_factors=factors)
        assert all(q.grad is None for q in factored_params)
        for p, q in zip(dense_params, factored_params):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert all(not torch.allclose(p, p0) for p, p0 in zip(dense_params, initial))


def dense_grad_count(model) -> dict[str, int]:
    """Counts, per decoder weight, how often a dense gradient was accumulated into it."""
    counts = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and ".layers." in name:
            counts[name] = 0
            # The hook also runs, with .grad still None, for a weight given no gradient.
            p.register_post_accumulate_grad_hook(
                lambda p, name=name: counts.__setitem__(name, counts[name] + (p.grad is not None)))
    return counts


def step_both_ways(model, make_optimizer, examples, options, monkeypatch, steps: int = 2):
    """Train a copy of `model` with factored gradients and one with dense gradients; returns
    (factored model, dense model, factored results, dense results, dense-gradient counts)."""
    dense_model = copy.deepcopy(model)
    counts = dense_grad_count(model)
    factored_opt, dense_opt = make_optimizer(model), make_optimizer(dense_model)
    factored_results, dense_results = [], []
    for _ in range(steps):
        factored_results.append(train_step(model, factored_opt, examples, options))
        with monkeypatch.context() as patch:
            patch.setattr(grad_factors, "MAX_SIZE_FRACTION", 0.0)
            dense_results.append(train_step(dense_model, dense_opt, examples, options))
    return model, dense_model, factored_results, dense_results, counts


def assert_same_weights(a, b, rtol=1e-5, atol=1e-5):  # updates here are ~0.1
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=rtol, atol=atol), name


OPTIMIZERS = {
    "apollo-mini": lambda m: apollo_mini(apollo_param_groups(m), lr=1e-2),
    "apollo": lambda m: Apollo(apollo_param_groups(m), lr=1e-2, rank=4),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_sft_step_with_factored_gradients_equals_the_dense_step(arch, optimizer, monkeypatch):
    examples = [SFTExample(CTX, answer) for answer in ANSWERS]  # accumulated over two examples
    model, dense, results, dense_results, counts = step_both_ways(
        build_tiny_model(arch), OPTIMIZERS[optimizer], examples, StepOptions(max_grad_norm=0.5), monkeypatch)
    assert all(r.applied for r in results + dense_results)
    assert all(n == 0 for n in counts.values()), "a dense gradient was formed"
    for r, d in zip(results, dense_results):
        assert r.loss == pytest.approx(d.loss, rel=1e-5) and r.grad_norm == pytest.approx(d.grad_norm, rel=1e-4)
    assert_same_weights(model, dense)
    untrained = build_tiny_model(arch).model.layers[0].mlp.down_proj.weight
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, untrained)


def test_preference_step_with_factored_gradients_equals_the_dense_step(monkeypatch):
    pair = PreferenceExample(CTX, ANSWERS[0], ANSWERS[1])  # each weight is used by both answers
    model, dense, results, dense_results, counts = step_both_ways(
        build_tiny_model("llama"), OPTIMIZERS["apollo-mini"], [pair], StepOptions(loss="orpo"), monkeypatch)
    assert all(n == 0 for n in counts.values())
    assert results[-1].grad_norm == pytest.approx(dense_results[-1].grad_norm, rel=1e-4)
    assert_same_weights(model, dense)


def test_bf16_step_under_float32_compute_is_the_fp32_step_rounded_once(monkeypatch):
    """The factors are fp32 (the dense path rounds G to bf16 first), so a bf16 model's step is
    its fp32 copy's step, stochastically rounded to one of the two nearest bf16 values."""
    monkeypatch.setenv(ENV, "1")
    bf16 = build_tiny_model("llama").to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()
    counts = dense_grad_count(bf16)
    example = [SFTExample(CTX, ANSWERS[0])]
    result = train_step(bf16, OPTIMIZERS["apollo-mini"](bf16), example)
    reference = train_step(fp32, OPTIMIZERS["apollo-mini"](fp32), example)
    assert all(n == 0 for n in counts.values())
    assert result.grad_norm == pytest.approx(reference.grad_norm, rel=1e-4)
    for (name, p), q in zip(bf16.named_parameters(), fp32.parameters()):
        if p.dim() == 2 and ".layers." in name:
            ulp = torch.exp2(torch.floor(torch.log2(q.detach().abs())) - 7)
            assert p.dtype == torch.bfloat16 and ((p.float() - q).abs() <= ulp * 1.001).all(), name


def test_a_trained_tied_embedding_gets_its_factors_folded_into_its_dense_gradient(monkeypatch):
    def make(m):  # the tied embedding is looked up (dense gradient) and is the LM head (factors)
        return Apollo([{"params": [m.get_input_embeddings().weight]}], lr=1e-2, rank=1, scale_type="tensor")
    model, dense, results, dense_results, _ = step_both_ways(
        build_tiny_model("llama"), make, [SFTExample(CTX, ANSWERS[0])], StepOptions(), monkeypatch)
    assert results[-1].grad_norm == pytest.approx(dense_results[-1].grad_norm, rel=1e-4)
    assert_same_weights(model, dense)


def test_long_batches_get_dense_gradients():
    model = build_tiny_model("llama")
    counts = dense_grad_count(model)
    long_answer = tuple(torch.randint(3, 1000, (40,)).tolist())  # 40 * (64 + 64) > 64 * 64 / 2
    result = train_step(model, OPTIMIZERS["apollo-mini"](model), [SFTExample(CTX, long_answer)])
    assert result.applied
    assert counts["model.layers.0.self_attn.q_proj.weight"] == 1


def test_non_finite_factors_leave_the_weights_bit_identical():
    model = build_tiny_model("llama")
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}

    def infinite_output_grad(module, args, out):  # gate_proj's dY becomes inf
        if out.requires_grad:  # not in the context's no-grad prefill
            out.register_hook(lambda grad: grad * float("inf"))

    model.model.layers[0].mlp.gate_proj.register_forward_hook(infinite_output_grad)
    result = train_step(model, OPTIMIZERS["apollo-mini"](model), [SFTExample(CTX, ANSWERS[0])])
    assert not result.applied and result.reason == "non-finite gradient"
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def test_a_step_keeps_no_activation_alive_after_it_returns():
    """The factors hold inputs saved for backward; held with their autograd history they
    would keep each step's whole graph alive (about 30 MiB a step on the default model)."""
    model = build_tiny_model("llama")
    inputs = []

    def keep_weak_reference(module, args):
        if args[0].requires_grad:
            inputs.append(weakref.ref(args[0]))

    model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(keep_weak_reference)
    optimizer = OPTIMIZERS["apollo-mini"](model)
    for _ in range(2):
        assert train_step(model, optimizer, [SFTExample(CTX, ANSWERS[0])]).applied
    gc.collect()
    assert len(inputs) == 2 and all(ref() is None for ref in inputs)
