"""Why bf16 weights need stochastic rounding: tiny updates add up only in expectation."""

from __future__ import annotations

import pytest
import torch

from livetrain.optim import Apollo, apollo_mini, copy_stochastic_


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    source = torch.full((100_000,), 1.0 + 2 ** -9)  # a quarter of the way from 1 to 1 + 2**-7
    target = torch.empty_like(source, dtype=torch.bfloat16)
    copy_stochastic_(target, source, torch.Generator().manual_seed(0))
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    rounded_up = (target.float() > 1.0).float().mean().item()
    assert rounded_up == pytest.approx(0.25, abs=0.01)  # 7 standard deviations


def test_stochastic_rounding_keeps_representable_values_and_signs():
    source = torch.tensor([0.0, -1.5, 3.0, -0.0, float("inf"), -float("inf")])
    target = torch.empty_like(source, dtype=torch.bfloat16)
    copy_stochastic_(target, source)
    assert torch.equal(target.float(), source)


def fixed_gradient_run(dtype: torch.dtype, stochastic_rounding: bool, steps: int = 300) -> torch.Tensor:
    """APOLLO-Mini on a weight of ones with one fixed, positive gradient: every step moves
    each weight down by ~1e-4 (lr), far below bf16's spacing of 2**-8 just below 1.0."""
    g = torch.Generator().manual_seed(0)
    grad = torch.rand(32, 64, generator=g) + 0.5
    weight = torch.nn.Parameter(torch.ones(32, 64, dtype=dtype))
    opt = apollo_mini([weight], lr=1e-4, stochastic_rounding=stochastic_rounding)
    for _ in range(steps):
        weight.grad = grad.to(dtype)
        opt.step()
    return weight.detach().float()


def test_tiny_bf16_updates_vanish_with_round_to_nearest_but_add_up_with_stochastic_rounding():
    exact = fixed_gradient_run(torch.float32, stochastic_rounding=False)
    moved = (1.0 - exact).mean().item()
    assert moved > 0.01  # the fp32 reference travels ~3 bf16 spacings in total

    nearest = fixed_gradient_run(torch.bfloat16, stochastic_rounding=False)
    assert torch.equal(nearest, torch.ones_like(nearest))  # every single update was lost

    stochastic = fixed_gradient_run(torch.bfloat16, stochastic_rounding=True)
    assert (1.0 - stochastic).mean().item() == pytest.approx(moved, rel=0.03)


def test_stochastic_rounding_is_on_by_default_for_bf16_only():
    bf16 = fixed_gradient_run(torch.bfloat16, stochastic_rounding=None, steps=50)
    assert not torch.equal(bf16, torch.ones_like(bf16))


def test_adamw_group_rounds_bf16_stochastically_too():
    weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = Apollo([weight], lr=1e-4, rank=None)
    for _ in range(100):
        weight.grad = torch.ones_like(weight)
        opt.step()
    # Adam's step on a constant gradient is lr: 100 steps move each weight by ~1e-2.
    assert (1.0 - weight.float()).mean().item() == pytest.approx(1e-2, rel=0.05)
