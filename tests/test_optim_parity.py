"""Numerical parity with the authors' implementation (PyPI `apollo-torch`).

Both optimizers see the same gradients; ours is handed the authors' projection matrices
(their seeds and generator differ from ours by design), so every step, including the
projection refreshes, must give the same update.
"""

from __future__ import annotations

import pytest
import torch

from livetrain.optim import Apollo
from livetrain.optim.apollo import projected_axis

apollo_torch = pytest.importorskip("apollo_torch")

SHAPES = [(48, 32), (24, 64), (40, 40)]  # rows > cols, rows < cols, square
PRESETS = {"apollo-mini": dict(rank=1, scale_type="tensor"),
           "apollo": dict(rank=8, scale_type="channel")}
STEPS, GAP, LR = 25, 10, 1e-2


def growing_gradient(shape: tuple[int, int], step: int, generator: torch.Generator) -> torch.Tensor:
    """Random gradients whose norm grows 1.6× per step for a while: the limiter must act."""
    growth = 1.6 ** step if 5 <= step < 12 else 1.0
    return torch.randn(shape, generator=generator) * growth


def run_side_by_side(preset: dict, weight_decay: float = 0.0,
                     norm_growth_limit: float | None = 1.01) -> tuple[list[float], list[float], int]:
    """Per-step relative update difference, relative weight difference, and refresh count."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) * 0.01 for s in SHAPES]
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    their_params = [torch.nn.Parameter(t.clone()) for t in init]
    rank = preset["rank"]
    # One group per weight: their `scale` is α², per group; ours defaults to α = √(k/r).
    theirs = apollo_torch.APOLLOAdamW(
        [{"params": [p], "rank": rank, "proj": "random", "proj_type": "std",
          "scale_type": preset["scale_type"], "update_proj_gap": GAP,
          "scale": p.shape[projected_axis(p)] / rank} for p in their_params],
        lr=LR, eps=1e-8, weight_decay=weight_decay)
    ours = Apollo(ours_params, lr=LR, eps=1e-8, update_proj_gap=GAP, weight_decay=weight_decay,
                  norm_growth_limit=norm_growth_limit, **preset)

    refreshes = 0

    def their_projection(p: torch.Tensor, seed: int, rank: int) -> torch.Tensor:
        nonlocal refreshes
        refreshes += 1
        theirs_p = their_params[next(i for i, q in enumerate(ours_params) if q is p)]
        matrix = theirs.state[theirs_p]["projector"].ortho_matrix  # (r, n) right, (m, r) left
        return (matrix if projected_axis(p) == 1 else matrix.T).clone()

    ours._generate_projection = their_projection

    update_errors, weight_errors = [], []
    for step in range(STEPS):
        for p, q in zip(ours_params, their_params):
            grad = growing_gradient(p.shape, step, g)
            p.grad, q.grad = grad.clone(), grad.clone()
        before = [p.detach().clone() for p in ours_params]
        theirs.step()  # first: it refreshes its projection, which ours then borrows
        ours.step()
        for b, p, q in zip(before, ours_params, their_params):
            ours_update, their_update = p.detach() - b, q.detach() - b
            update_errors.append(float((ours_update - their_update).norm() / their_update.norm()))
            weight_errors.append(float((p.detach() - q.detach()).norm() / q.detach().norm()))
    return update_errors, weight_errors, refreshes


@pytest.mark.parametrize("preset", PRESETS.values(), ids=PRESETS.keys())
def test_updates_match_the_authors_implementation_across_projection_refreshes(preset):
    update_errors, _, refreshes = run_side_by_side(preset)
    assert refreshes == len(SHAPES) * 3  # steps 1, 11 and 21
    assert max(update_errors) < 1e-5


@pytest.mark.parametrize("preset", PRESETS.values(), ids=PRESETS.keys())
def test_device_side_limiter_acts_exactly_like_the_authors_host_side_one(preset):
    """Ours clamps on the device; theirs uses Python `max`. The limiter does act here:
    without it the updates differ by a third."""
    unlimited_errors, _, _ = run_side_by_side(preset, norm_growth_limit=None)
    assert max(unlimited_errors) > 0.1
    limited_errors, _, _ = run_side_by_side(preset)
    assert max(limited_errors) < 1e-5


def test_weight_decay_order_differs_from_the_authors_only_at_second_order():
    """Ours decays the weights before the update, as torch.optim.AdamW does; theirs after
    it. The difference per step is lr²·λ·update: tiny, and not an error."""
    _, weight_errors, _ = run_side_by_side(PRESETS["apollo"], weight_decay=0.01)
    assert max(weight_errors) < 1e-4
