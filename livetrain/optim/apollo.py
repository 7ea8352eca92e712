"""APOLLO and APOLLO-Mini (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level
Performance", arXiv:2412.05270).

AdamW divides every gradient entry by its own running RMS, which costs two full-size
moment tensors. APOLLO observes that the effect of that division, measured per channel,
can be estimated in a small random projection of the gradient. Per 2-D weight W
(m, n) with gradient G (m, n):

1. Project G on its smaller side with a seeded Gaussian matrix P (r, k), entries
   N(0, 1/r), k the projected side's size (k = n when m >= n, else k = m):
       m >= n:  R = G Pᵀ   (m, r)   channels are the m rows
       m <  n:  R = P G    (r, n)   channels are the n columns
2. Adam moments of R only (the shape of R), N = M / (√V + eps).
3. Scaling factor per channel c:  s_c = ‖N_c‖ / ‖R_c‖   (scale_type "channel"),
   or one scalar s = ‖N‖ / ‖R‖                          (scale_type "tensor").
4. Update direction U = G·diag(s) (s along the channels: each channel of the raw
   gradient keeps its direction), limited so that ‖U‖ grows at most γ per step.
5. W ← W·(1 − lr·λ) − lr · (√(1−β2ᵗ) / (1−β1ᵗ)) · α · U,  α = √(k / r) by default.

P is regenerated from a per-parameter seed every `update_proj_gap` steps; it is never
saved. Parameters in a group with `rank=None` (norms, biases, embeddings) take plain
AdamW. See docs/optimizer.md for where this differs from the authors' code, and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate, chain
from typing import Any

import torch
from torch.optim import Optimizer

from livetrain.optim.grad_factors import GradFactors, has_gradient
from livetrain.optim.stochastic_rounding import copy_stochastic_

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

SCALE_TYPES = ("channel", "tensor")
# Guards a zero denominator in the scaling factor and in the limiter (the authors' value).
_TINY = 1e-8
# Independent random streams derived from one parameter's seed.
_PROJECTION_STREAM = 1
_ROUNDING_STREAM = 2
_MASK64 = (1 << 64) - 1
# Weights are stepped in batches of at most this many gradient bytes: few enough batches
# that the per-batch ops stay few, small enough to bound the batch's temporary
# projected-space buffers (at rank 256 they are about half the gradients' size).
_BATCH_BYTES = 64 << 20


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finalizer), stable across runs and versions."""
    mixed = 0x9E3779B97F4A7C15
    for value in values:
        mixed = ((mixed ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        mixed ^= mixed >> 31
        mixed = (mixed * 0x94D049BB133111EB) & _MASK64
        mixed ^= mixed >> 29
    return mixed >> 1


def projected_axis(weight: torch.Tensor) -> int:
    """The axis of a 2-D weight that the projection reduces: its smaller side (columns on ties)."""
    return 1 if weight.shape[0] >= weight.shape[1] else 0


def effective_rank(weight: torch.Tensor, rank: int) -> int:
    """`rank`, capped at the projected side: projecting k values onto more than k gains nothing."""
    return min(rank, weight.shape[projected_axis(weight)])


class Apollo(Optimizer):
    """APOLLO (defaults: rank 256, channel-wise) with per-group hyper-parameters.

    Args:
        params: parameters or parameter groups (dicts may override any argument below).
            With `rank` set, every parameter of the group must be 2-D.
        lr: learning rate.
        rank: projection rank r (capped per weight at its smaller side), or None for plain
            AdamW (for norms, biases and embeddings in the same optimizer).
        scale_type: "channel" (one scaling factor per channel, for r > 1) or "tensor"
            (one per weight, for r = 1).
        scale: α, the factor on the update. None: √(k / r) per weight, k the projected
            side, so the update has AdamW's size. The authors' package takes α² as its
            `scale` argument: their `scale=128` (the paper's APOLLO-Mini) is `math.sqrt(128)`.
        update_proj_gap: steps between projection refreshes.
        betas, eps: Adam's moment decays and denominator guard.
        weight_decay: decoupled weight decay λ (W ← W·(1 − lr·λ)).
        norm_growth_limit: γ, the most the update's norm may grow per step; None disables.
        stochastic_rounding: round updated bf16 weights stochastically. None: on for bf16
            weights. Other dtypes round to nearest (fp32 weights are updated in place).
        seed: base seed of the projections and of the rounding noise.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, rank: int | None = 256,
                 scale_type: str = "channel", scale: float | None = None,
                 update_proj_gap: int = 200, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 norm_growth_limit: float | None = 1.01,
                 stochastic_rounding: bool | None = None, seed: int = 0) -> None:
        defaults = dict(lr=lr, rank=rank, scale_type=scale_type, scale=scale,
                        update_proj_gap=update_proj_gap, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, norm_growth_limit=norm_growth_limit,
                        stochastic_rounding=stochastic_rounding, seed=seed)
        # The current projection of each parameter and the refresh it belongs to. Not
        # state: it is regenerated from the parameter's seed whenever it is missing.
        self._projections: dict[torch.Tensor, tuple[int, torch.Tensor]] = {}
        # Flat buffers of each batch of APOLLO weights, by the batch's first weight.
        self._layouts: dict[torch.Tensor, _FlatLayout] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating its hyper-parameters (ValueError) before it is added."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}
        _validate_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, grad_scale: float | None = None,
             grad_norms: Mapping[torch.Tensor, torch.Tensor] | None = None,
             grad_factors: GradFactors | None = None) -> float | None:
        """One update of every parameter that has a gradient. Never reads a tensor's value
        on the host, so it does not stall an accelerator.

        grad_scale: step as if every gradient were multiplied by it, without rewriting the
        gradients (how gradient clipping is applied: the factor goes onto the projected
        gradient, the norms and the scaling factors, which are small, instead of a pass
        over every gradient). None: 1.
        grad_norms: the L2 norm (0-dim, float32) of parameters' gradients that the caller
        has already taken (for clipping), by parameter; tensor-wise scaling uses them
        instead of a pass over those gradients.
        grad_factors: gradients of APOLLO weights given as factors (dY, X), G = dYᵀ·X,
        instead of `.grad` (`livetrain.optim.grad_factors`): the projection, the norms and
        the update are computed from the factors, G is never formed. A weight that has a
        `.grad` steps on it alone (`GradFactors.fold_into_grads` adds the factors first).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            factors = grad_factors if group["rank"] is not None else None
            params = [p for p in group["params"] if has_gradient(p, factors)]
            if any(p.grad is not None and p.grad.is_sparse for p in params):
                raise RuntimeError("Apollo does not support sparse gradients")
            if not params:
                continue
            if group["rank"] is None:
                self._adamw_step(group, params, grad_scale)
            else:
                for batch in _batches(params, _BATCH_BYTES):
                    self._apollo_step(group, batch, grad_scale, grad_norms or {}, factors)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by `state_dict()` (also after `torch.load(weights_only=True)`).

        The moments are restored in fp32 (torch's loader would cast them to each
        parameter's dtype); projections are regenerated from the saved seeds.
        """
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                self.state[p] = {key: value.to(device=p.device, copy=True)
                                 if isinstance(value, torch.Tensor) else value
                                 for key, value in saved.items()}
        self._projections.clear()
        self._layouts.clear()

    def projection(self, p: torch.Tensor) -> torch.Tensor:
        """The projection P (r, k) that `p`'s next step uses (after at least one step)."""
        state = self.state[p]
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        return self._projection(p, state["seed"], state["step"] + 1, group)[:effective_rank(p, group["rank"])]

    # --- APOLLO -----------------------------------------------------------------------

    def _apollo_step(self, group: dict[str, Any], params: list[torch.Tensor], grad_scale: float | None,
                     known_norms: Mapping[torch.Tensor, torch.Tensor], factors: GradFactors | None) -> None:
        """One step of a batch of weights on one device. The small projected-space math
        runs on the batch's flat buffers: a few ops per batch, not per weight. A weight
        without `.grad` has its gradient in `factors`."""
        beta1, beta2 = group["betas"]
        channelwise = group["scale_type"] == "channel"
        layout = self._layout(group, params)
        states = [self.state[p] for p in params]
        projected = torch.empty_like(layout.exp_avg)  # (F,): R of every weight, channel-major
        # ‖G‖ per channel (C,) or per weight (P,): with the scaling factors it gives
        # ‖G·diag(s)‖ without forming G·diag(s).
        grad_norms = projected.new_empty(layout.channel_offsets[-1] if channelwise else len(params))
        for i, (p, state) in enumerate(zip(params, states)):
            state["step"] += 1
            axis = projected_axis(p)
            proj = self._projection(p, state["seed"], state["step"], group)  # (r or 2, k)
            if p.grad is None:
                # (channels, r): R = G Pᵀ = dYᵀ (X Pᵀ) for m >= n; Rᵀ = Gᵀ Pᵀ = Xᵀ (dY Pᵀ) for m < n.
                grad_rows, input_rows = factors.get(p)
                rows, other = (grad_rows, input_rows) if axis == 1 else (input_rows, grad_rows)
                out = layout.view(projected, i)
                torch.mm(rows.t(), other @ proj[:out.shape[1]].t(), out=out)
                if channelwise:
                    grad_norms[layout.channels(i)] = factors.channel_norms(p, axis)
                else:
                    grad_norms[i] = known_norms[p] if p in known_norms else factors.norm(p)
                continue
            grad = p.grad.float()  # the gradient itself when it is fp32
            # (channels, r): R = G Pᵀ for m >= n; Rᵀ = Gᵀ Pᵀ for m < n.
            _project(grad if axis == 1 else grad.t(), proj, out=layout.view(projected, i))
            if channelwise:
                torch.linalg.vector_norm(p.grad, dim=axis, dtype=torch.float32,
                                         out=grad_norms[layout.channels(i)])
            elif p in known_norms:
                grad_norms[i] = known_norms[p]
            else:
                torch.linalg.vector_norm(p.grad, dtype=torch.float32, out=grad_norms[i])
        if grad_scale is not None:  # R and ‖G‖ of grad_scale · G
            projected.mul_(grad_scale)
            grad_norms.mul_(grad_scale)

        # Adam in the projected space, all weights at once (F,).
        layout.exp_avg.lerp_(projected, 1 - beta1)
        layout.exp_avg_sq.mul_(beta2).addcmul_(projected, projected, value=1 - beta2)
        normalized = layout.exp_avg_sq.sqrt().add_(group["eps"])
        torch.div(layout.exp_avg, normalized, out=normalized)

        # Scaling factors s = ‖N‖ / ‖R‖ per channel (C,) or per weight (P,).
        segment_norms = layout.channel_norms if channelwise else layout.weight_norms
        scales = segment_norms(normalized)
        scales.div_(segment_norms(projected).add_(_TINY))
        if channelwise:  # ‖G·diag(s)‖ per weight (P,)
            scaled_norms = _segment_norms(scales * grad_norms, layout.channels_per_weight)
        else:
            scaled_norms = scales * grad_norms

        if group["norm_growth_limit"] is not None:
            divisors = _limit_norm_growth(scaled_norms, layout.update_norm,
                                          group["norm_growth_limit"])
            scales.div_(divisors.repeat_interleave(layout.channels_per_weight,
                                                   output_size=scales.numel())
                        if channelwise else divisors)
        if grad_scale is not None:  # the update applies s to grad_scale · G
            scales.mul_(grad_scale)

        for i, (p, state) in enumerate(zip(params, states)):
            if channelwise:  # (m, 1) scales rows, (1, n) scales columns
                scale = scales[layout.channels(i)].unsqueeze(1 if projected_axis(p) == 1 else 0)
            else:
                scale = scales[i]
            # W ← W − lr · bias correction · α · G ⊙ s, in one pass over G and W.
            weights = self._decayed_fp32_weights(p, group)
            step_size = -self._step_size(state, group) * self._alpha(p, group)
            if p.grad is None:  # one product into W: (dY ⊙ s)ᵀ X for a scale per row, else dYᵀ (X ⊙ s)
                grad_rows, input_rows = factors.get(p)
                if channelwise and projected_axis(p) == 1:
                    weights.addmm_(grad_rows.mul(scale.view(1, -1)).t(), input_rows, alpha=step_size)
                else:
                    weights.addmm_(grad_rows.t(), input_rows.mul(scale.view(1, -1)), alpha=step_size)
            else:
                weights.addcmul_(p.grad, scale, value=step_size)
            self._store(p, weights, state, group)

    def _layout(self, group: dict[str, Any], params: list[torch.Tensor]) -> _FlatLayout:
        """The batch's flat buffers; (re)built when the batch or the rank changed, or when
        the state was replaced (e.g. by `load_state_dict`), from the state's values."""
        layout = self._layouts.get(params[0])
        if layout is None or not layout.holds(params, group, self.state):
            for p in params:
                self._init_state(p, group)
            layout = _FlatLayout(params, group, [self.state[p] for p in params])
            self._layouts[params[0]] = layout
        return layout

    @staticmethod
    def _alpha(p: torch.Tensor, group: dict[str, Any]) -> float:
        if group["scale"] is not None:
            return group["scale"]
        return math.sqrt(p.shape[projected_axis(p)] / effective_rank(p, group["rank"]))

    def _projection(self, p: torch.Tensor, seed: int, step: int,
                    group: dict[str, Any]) -> torch.Tensor:
        """P (r, k) for `step` (counted from 1), regenerated at each refresh; at r = 1 for a
        weight with m >= n, [P; 0] (2, k), the operand `_project` multiplies by."""
        refresh = (step - 1) // group["update_proj_gap"]
        cached = self._projections.get(p)
        if cached is None or cached[0] != refresh:
            rank = effective_rank(p, group["rank"])
            proj = self._generate_projection(p, mix_seed(seed, _PROJECTION_STREAM, refresh), rank)
            if rank == 1 and projected_axis(p) == 1:
                proj = torch.cat([proj, torch.zeros_like(proj)])
            cached = (refresh, proj)
            self._projections[p] = cached
        return cached[1]

    @staticmethod
    def _generate_projection(p: torch.Tensor, seed: int, rank: int) -> torch.Tensor:
        """Gaussian P (r, k) with N(0, 1/r) entries, so that ‖P x‖ ≈ ‖x‖ on average."""
        generator = torch.Generator(device=p.device).manual_seed(seed)
        proj = torch.randn((rank, p.shape[projected_axis(p)]), generator=generator,
                           device=p.device, dtype=torch.float32)
        return proj.div_(math.sqrt(rank))

    # --- AdamW (groups with rank=None) ------------------------------------------------

    def _adamw_step(self, group: dict[str, Any], params: list[torch.Tensor], grad_scale: float | None) -> None:
        beta1, beta2 = group["betas"]
        for p in params:
            state = self._init_state(p, group)
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            grad = p.grad.float() if grad_scale is None else p.grad.float().mul(grad_scale)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2 = 1 - beta2 ** state["step"]
            denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction2)).add_(group["eps"])
            weights = self._decayed_fp32_weights(p, group)
            weights.addcdiv_(exp_avg, denom, value=-group["lr"] / bias_correction1)
            self._store(p, weights, state, group)

    # --- shared -----------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """A weight's step counter and seed (its moments are made by its update rule)."""
        state = self.state[p]
        if not state:
            index = next(i for i, q in enumerate(
                chain.from_iterable(g["params"] for g in self.param_groups)) if q is p)
            state["step"] = 0
            state["seed"] = mix_seed(group["seed"], index)
        return state

    @staticmethod
    def _step_size(state: dict[str, Any], group: dict[str, Any]) -> float:
        """lr · √(1 − β2ᵗ) / (1 − β1ᵗ): Adam's bias correction, applied to the step."""
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])

    @staticmethod
    def _decayed_fp32_weights(p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """The weights to add the update to, in fp32, after decoupled weight decay:
        `p` itself when it is fp32, else a temporary fp32 copy that `_store` writes back."""
        weights = p if p.dtype == torch.float32 else p.float()
        if group["weight_decay"] != 0:
            weights.mul_(1 - group["lr"] * group["weight_decay"])
        return weights

    @staticmethod
    def _store(p: torch.Tensor, weights: torch.Tensor, state: dict[str, Any],
               group: dict[str, Any]) -> None:
        if weights is p:
            return
        if p.dtype == torch.bfloat16 and group["stochastic_rounding"] is not False:
            # Seeded by (parameter, step): a resumed run rounds exactly as an unbroken one.
            generator = torch.Generator(device=p.device).manual_seed(
                mix_seed(state["seed"], _ROUNDING_STREAM, state["step"]))
            copy_stochastic_(p, weights, generator)
        else:
            p.copy_(weights)


def _project(gradient: torch.Tensor, operand: torch.Tensor, out: torch.Tensor) -> None:
    """out (c, r) = gradient (c, k) · Pᵀ (k, r), where `operand` is `Apollo._projection`'s
    P (r, k), or [P; 0] (2, k) at r = 1 when m >= n.

    At r = 1 with a row-major gradient (R = G Pᵀ) the product is a matrix-vector product,
    which MKL runs about 3x slower than the same product with a zero column more: with
    [P; 0] it keeps the first column of that. A transposed gradient (Rᵀ = Gᵀ Pᵀ) is fast
    as a matrix-vector product and 8x slower padded (docs/optimizer.md).
    """
    rank = out.shape[1]
    if operand.shape[0] != rank and gradient.is_contiguous():
        out.copy_(torch.mm(gradient, operand.t())[:, :rank])
    else:
        torch.mm(gradient, operand[:rank].t(), out=out)


def _segment_norms(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """L2 norm of each run of `values` (F,), runs given by `lengths` (S,); squares `values`
    in place. `unsafe`: the lengths are ours and checking them would read them on the host."""
    return torch.segment_reduce(values.square_(), "sum", lengths=lengths, unsafe=True).sqrt_()


def _limit_norm_growth(scaled_norms: torch.Tensor, update_norm: torch.Tensor,
                       gamma: float) -> torch.Tensor:
    """Divisors (P,) >= 1 that keep each weight's ‖G·diag(s)‖ (`scaled_norms`, (P,))
    within γ times last step's, computed on the device.

    `update_norm` (P,) holds last step's limited norms and is updated in place; it starts
    at +inf, so the first step is never limited (as in the authors' code).
    """
    divisors = scaled_norms / (update_norm + _TINY)
    divisors.clamp_min_(gamma).div_(gamma)  # max(growth, γ) / γ
    torch.div(scaled_norms, divisors, out=update_norm)
    return divisors


class _FlatLayout:
    """Flat fp32 buffers holding the APOLLO state of a batch of weights.

    Projected tensors are stored channel-major, (channels, r): R (m, r) for m >= n and
    Rᵀ (n, r) for m < n, so that each channel is one contiguous run of r values and each
    weight one run of channels·r values. The weights' state entries ("exp_avg",
    "exp_avg_sq": (channels, r); "update_norm": 0-dim) are views into these buffers, so a
    saved state dict holds each buffer once.
    """

    def __init__(self, params: list[torch.Tensor], group: dict[str, Any],
                 states: list[dict[str, Any]]) -> None:
        device = params[0].device
        self.params = list(params)
        self.rank = group["rank"]
        self.ranks = [effective_rank(p, group["rank"]) for p in params]
        self.channel_counts = [p.shape[0] if projected_axis(p) == 1 else p.shape[1]
                               for p in params]
        sizes = [c * r for c, r in zip(self.channel_counts, self.ranks)]
        self.value_offsets = [0, *accumulate(sizes)]
        self.channel_offsets = [0, *accumulate(self.channel_counts)]
        self.weight_lengths = torch.tensor(sizes, device=device)
        self.channels_per_weight = torch.tensor(self.channel_counts, device=device)
        self.exp_avg = torch.zeros(self.value_offsets[-1], device=device)
        self.exp_avg_sq = torch.zeros(self.value_offsets[-1], device=device)
        self.update_norm = torch.full((len(params),), math.inf, device=device)
        self.exp_avg_views = []
        for i, state in enumerate(states):
            for key, buffer in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                view = self.view(buffer, i)
                if key in state:
                    view.copy_(state[key].reshape(view.shape))
                state[key] = view
            self.exp_avg_views.append(state["exp_avg"])
            if "update_norm" in state:
                self.update_norm[i].copy_(state["update_norm"])
            state["update_norm"] = self.update_norm[i]

    def view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        """Weight i's (channels, r) part of a flat (F,) buffer."""
        start, end = self.value_offsets[i], self.value_offsets[i + 1]
        return buffer[start:end].view(self.channel_counts[i], self.ranks[i])

    def channel_norms(self, buffer: torch.Tensor) -> torch.Tensor:
        """‖·‖ of each channel's r values in a flat (F,) buffer: (C,)."""
        norms = buffer.new_empty(self.channel_offsets[-1])
        for i in range(len(self.params)):
            torch.linalg.vector_norm(self.view(buffer, i), dim=1, out=norms[self.channels(i)])
        return norms

    def weight_norms(self, buffer: torch.Tensor) -> torch.Tensor:
        """‖·‖ of each weight's values in a flat (F,) buffer: (P,). Squares `buffer` in place."""
        return _segment_norms(buffer, self.weight_lengths)

    def channels(self, i: int) -> slice:
        """Weight i's part of a per-channel (C,) vector."""
        return slice(self.channel_offsets[i], self.channel_offsets[i + 1])

    def holds(self, params: list[torch.Tensor], group: dict[str, Any],
              states: dict[torch.Tensor, dict[str, Any]]) -> bool:
        """Whether this layout still backs exactly these weights' state."""
        return (self.rank == group["rank"] and len(params) == len(self.params)
                and all(p is q for p, q in zip(params, self.params))
                and all(states[p].get("exp_avg") is view
                        for p, view in zip(params, self.exp_avg_views)))


def _batches(params: list[torch.Tensor], max_bytes: int) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of `params` on one device whose gradients hold at most `max_bytes`
    (at least one weight each)."""
    batch, size = [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if batch and (size + nbytes > max_bytes or p.device != batch[0].device):
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += nbytes
    if batch:
        yield batch


def apollo_mini(params: ParamsT, lr: float = 1e-3, **kwargs: Any) -> Apollo:
    """APOLLO-Mini: rank 1, one tensor-wise scaling factor per weight (SGD-sized state)."""
    return Apollo(params, lr=lr, rank=1, scale_type="tensor", **kwargs)


def _validate_group(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad hyper-parameter of a (defaults-merged) group."""
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    check(isinstance(group["lr"], (int, float)) and group["lr"] >= 0,
          f"lr must be a number >= 0, got {group['lr']!r}")
    rank = group["rank"]
    check(rank is None or (is_int(rank) and rank >= 1),
          f"rank must be an integer >= 1 (or None for AdamW), got {rank!r}")
    check(group["scale_type"] in SCALE_TYPES,
          f"scale_type must be one of {SCALE_TYPES}, got {group['scale_type']!r}")
    check(group["scale"] is None or group["scale"] > 0,
          f"scale must be > 0 (or None for sqrt(k / rank)), got {group['scale']!r}")
    check(is_int(group["update_proj_gap"]) and group["update_proj_gap"] >= 1,
          f"update_proj_gap must be an integer >= 1, got {group['update_proj_gap']!r}")
    betas = group["betas"]
    check(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
          f"betas must be two numbers in [0, 1), got {betas!r}")
    check(group["eps"] >= 0, f"eps must be >= 0, got {group['eps']!r}")
    check(group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']!r}")
    limit = group["norm_growth_limit"]
    check(limit is None or limit >= 1,
          f"norm_growth_limit must be >= 1 (or None to disable), got {limit!r}")
    check(group["stochastic_rounding"] in (None, True, False),
          f"stochastic_rounding must be None, True or False, got {group['stochastic_rounding']!r}")
    check(is_int(group["seed"]), f"seed must be an integer, got {group['seed']!r}")
    for p in group["params"]:
        check(p.is_floating_point(), f"parameters must be floating point, got {p.dtype}")
        check(rank is None or p.dim() == 2,
              f"APOLLO projects 2-D weights; got a parameter of shape {tuple(p.shape)}: "
              "put it in a group with rank=None (AdamW) or leave it out")
