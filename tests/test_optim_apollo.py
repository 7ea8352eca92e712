"""The APOLLO optimizer's contract: arguments, groups, state round trip, no host reads."""

from __future__ import annotations

import io
import math

import pytest
import torch

from livetrain.optim import Apollo, apollo_mini
from livetrain.optim.apollo import projected_axis

SHAPES = [(48, 32), (24, 64), (40, 40)]


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dtype)) for s in SHAPES]


def set_gradients(params: list[torch.Tensor], step: int) -> None:
    """Deterministic gradients that depend only on the step (and the parameter's index)."""
    for i, p in enumerate(params):
        g = torch.Generator().manual_seed(1000 * step + i)
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def run_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        set_gradients(params, step)
        opt.step()


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "lr"),
    (dict(rank=0), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(-0.1, 0.999)), "betas"),
    (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(scale_type="row"), "scale_type"),
    (dict(scale=0.0), "scale"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(norm_growth_limit=0.5), "norm_growth_limit"),
])
def test_bad_arguments_raise_value_error_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Apollo(make_params(), **kwargs)


def test_bad_group_override_raises_and_leaves_optimizer_unchanged():
    opt = Apollo(make_params()[:1])
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": make_params()[1:], "rank": -1})
    assert len(opt.param_groups) == 1


def test_one_dimensional_parameter_in_apollo_group_is_refused():
    with pytest.raises(ValueError, match="rank=None"):
        Apollo([torch.nn.Parameter(torch.ones(8))])


def test_per_group_learning_rate_overrides_the_default():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = Apollo([{"params": params[:2]}, {"params": params[2:], "lr": 0.0}], lr=1e-2, rank=4)
    run_steps(opt, params, range(2))
    assert all(not torch.equal(p, b) for p, b in zip(params[:2], before[:2]))
    assert torch.equal(params[2], before[2])


def test_rank_none_group_is_plain_adamw():
    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(16, generator=g)), torch.nn.Parameter(torch.randn(8, 4, generator=g))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = Apollo(ours, lr=1e-2, rank=None, weight_decay=0.1, eps=1e-8)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, eps=1e-8)
    for step in range(10):
        set_gradients(ours, step)
        set_gradients(ref, step)
        opt.step()
        ref_opt.step()
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_weight_decay_is_decoupled():
    """With a zero gradient APOLLO's update is zero: only W·(1 − lr·λ) remains."""
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = Apollo(params, lr=0.1, rank=4, weight_decay=0.5)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b * (1 - 0.1 * 0.5))


def test_state_is_small_and_holds_no_projection():
    params = make_params()
    opt = apollo_mini(params)
    run_steps(opt, params, range(1))
    for p in params:
        state = opt.state[p]
        assert set(state) == {"step", "seed", "exp_avg", "exp_avg_sq", "update_norm"}
        channels = p.shape[0] if projected_axis(p) == 1 else p.shape[1]  # the larger side
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (channels, 1)
        assert state["exp_avg"].dtype == torch.float32


def test_rank_is_capped_at_the_projected_side():
    p = torch.nn.Parameter(torch.randn(24, 64))
    opt = Apollo([p], rank=256)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].shape == (64, 24)  # (channels, rank)
    assert opt.projection(p).shape == (24, 24)


def test_projection_refreshes_every_update_proj_gap_steps():
    p = torch.nn.Parameter(torch.randn(40, 24))
    opt = Apollo([p], rank=4, update_proj_gap=3)
    seen = []
    for step in range(7):
        set_gradients([p], step)
        opt.step()
        seen.append(opt._projections[p][1].clone())
    for step in (1, 2, 4, 5):
        assert torch.equal(seen[step], seen[step - 1])
    for step in (3, 6):
        assert not torch.equal(seen[step], seen[step - 1])


def save_and_load(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [apollo_mini, lambda params, **kw: Apollo(params, rank=4, **kw)],
                         ids=["mini", "apollo"])
def test_resume_from_saved_state_gives_identical_steps_across_a_refresh(make, dtype):
    gap, stop, total = 4, 6, 13  # refreshes before steps 5, 9 and 13 (counted from 1)
    unbroken = make_params(dtype)
    opt = make(unbroken, lr=1e-2, update_proj_gap=gap)
    run_steps(opt, unbroken, range(total))

    first = make_params(dtype)
    opt = make(first, lr=1e-2, update_proj_gap=gap)
    run_steps(opt, first, range(stop))
    saved = save_and_load(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt = make(resumed, lr=1e-2, update_proj_gap=gap)
    opt.load_state_dict(saved)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in resumed)
    run_steps(opt, resumed, range(stop, total))

    for p, q in zip(unbroken, resumed):
        assert torch.equal(p, q)


def test_step_never_reads_tensor_values_on_the_host(monkeypatch):
    """`.item()`, `float(t)`, `bool(t)` (e.g. Python `max` on tensors) would stall a GPU."""
    params = make_params()
    adamw_param = torch.nn.Parameter(torch.randn(8))
    opt = Apollo([{"params": params}, {"params": [adamw_param], "rank": None}], rank=4)

    def refuse(*args, **kwargs):
        raise AssertionError("step() read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for step in range(3):
        set_gradients(params + [adamw_param], step)
        opt.step()


def test_default_scale_is_sqrt_of_projected_side_over_rank():
    """α = √(k/r): with a fixed projection, the default step equals scale=√(k/r)."""
    p = torch.nn.Parameter(torch.randn(64, 16))
    q = torch.nn.Parameter(p.detach().clone())
    g = torch.randn(64, 16)
    p.grad, q.grad = g.clone(), g.clone()
    apollo_mini([p], lr=1e-3).step()
    apollo_mini([q], lr=1e-3, scale=math.sqrt(16 / 1)).step()
    assert torch.equal(p, q)


def test_closure_loss_is_returned():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = apollo_mini([p])

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and p.grad is not None


def test_weights_without_a_gradient_keep_their_state_while_others_step():
    params = make_params()
    opt = Apollo(params, rank=4, update_proj_gap=2)
    run_steps(opt, params, range(2))
    kept = {k: v.clone() for k, v in opt.state[params[1]].items() if isinstance(v, torch.Tensor)}
    weight = params[1].detach().clone()
    set_gradients(params, 2)
    params[1].grad = None
    opt.step()
    assert opt.state[params[1]]["step"] == 2 and opt.state[params[0]]["step"] == 3
    assert torch.equal(params[1], weight)
    for key, value in kept.items():
        assert torch.equal(opt.state[params[1]][key], value), key
    run_steps(opt, params, range(3, 5))
    assert opt.state[params[1]]["step"] == 4


@pytest.mark.parametrize("make", [apollo_mini, lambda params, **kw: Apollo(params, rank=4, **kw)],
                         ids=["mini", "apollo"])
def test_grad_scale_steps_as_if_the_gradients_were_scaled_and_leaves_them_unchanged(make):
    scaled, folded = make_params(), make_params()
    norms = [torch.nn.Parameter(torch.ones(8)) for _ in range(2)]  # a plain-AdamW group alongside
    groups = lambda params, extra: [{"params": params}, {"params": extra, "rank": None}]
    extra_scaled, extra_folded = norms[:1], norms[1:]
    opt_scaled = make(groups(scaled, extra_scaled), update_proj_gap=2)
    opt_folded = make(groups(folded, extra_folded), update_proj_gap=2)
    for step in range(5):  # across a projection refresh, with the limiter active
        factor = 0.5 ** step
        set_gradients(scaled + extra_scaled, step)
        set_gradients(folded + extra_folded, step)
        grads = [p.grad.clone() for p in folded + extra_folded]
        for p in scaled + extra_scaled:
            p.grad.mul_(factor)
        opt_scaled.step()
        opt_folded.step(grad_scale=factor)
        assert all(torch.equal(p.grad, g) for p, g in zip(folded + extra_folded, grads))
        for a, b in zip(scaled + extra_scaled, folded + extra_folded):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert not torch.equal(make_params()[0], folded[0])


def test_gradient_norms_given_by_the_caller_replace_its_own_pass_over_the_gradients():
    own, given, wrong = make_params(), make_params(), make_params()
    optimizers = [apollo_mini(params) for params in (own, given, wrong)]
    for step in range(3):
        for params in (own, given, wrong):
            set_gradients(params, step)
        optimizers[0].step()
        optimizers[1].step(grad_norms={p: torch.linalg.vector_norm(p.grad) for p in given})
        # Norms 100 times too large look like a sudden growth of the update: the limiter acts.
        factor = 100.0 if step == 2 else 1.0
        optimizers[2].step(grad_norms={p: torch.linalg.vector_norm(p.grad) * factor for p in wrong})
        for a, b in zip(own, given):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert not any(torch.allclose(a, c, rtol=1e-4, atol=0) for a, c in zip(own, wrong))
