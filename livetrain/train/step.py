"""One guarded, context-frozen optimizer step on a batch of examples.

Per example: the context minus its last token runs without grad (or comes from a
`ContextCache`); the last context token and the continuation (minus its last token) run
with grad on a fork of that frozen state, so every continuation token is predicted by a
position that has grad, and the loss covers the continuation only. A preference pair
runs its context once; both answers fork the same frozen state. Gradients accumulate
over the batch, then one optimizer step - unless a guard says no, in which case the
weights are left bit-identical and the result says why.

The speed-ups are separate layers: the optimizer's part of the step (factored
gradients, clipping, the update bound) is `livetrain.train.update`; how linear layers
compute and record gradient factors is `livetrain.train.linear`.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from livetrain.optim.grad_factors import recording_factors
from livetrain.train.context_cache import ContextCache
from livetrain.train.data import Example, PreferenceExample, SFTExample
from livetrain.train.frozen_context import FrozenContext, continuation_logits, prefill
from livetrain.train.linear import linear_seam
from livetrain.train.update import apply_update, combined_norm, factored_weights, gradient_norms
from livetrain.train.losses import dpo_loss, orpo_loss, token_logprobs

__all__ = ["Refusal", "StepOptions", "StepResult", "InvalidExampleError", "train_step", "continuation_logprobs",
           "validate_examples"]

LossKind = Literal["sft", "orpo", "dpo"]


class InvalidExampleError(ValueError):
    """An example cannot be trained on (bad token ids, empty part, too long, wrong kind
    for the loss). Raised before any computation."""


@dataclass
class StepOptions:
    """Per-step options.

    lr: learning rate for this step (all param groups); None keeps the optimizer's.
    loss: "sft" (SFTExample) or "orpo" / "dpo" (PreferenceExample).
    orpo_lambda: weight of ORPO's odds-ratio term. dpo_beta: DPO's β.
    max_grad_norm: clip the gradient's global L2 norm to this (None: no clipping).
    max_update_norm: scale the applied update down to this L2 norm (None: no bound).
    measure_update: measure the update's L2 norm (for the result and a ContextCache's
        update-norm budget). It costs a copy of the trained weights during the optimizer
        step (time and memory), so it is off unless asked for or max_update_norm is set.
    dry_run: compute loss and gradients, apply nothing.
    """

    lr: float | None = None
    loss: LossKind = "sft"
    orpo_lambda: float = 0.1
    dpo_beta: float = 0.1
    max_grad_norm: float | None = 1.0
    max_update_norm: float | None = None
    measure_update: bool = False
    dry_run: bool = False


class Refusal(enum.Enum):
    """Why a step left the weights as they were (the value is the reason's wording)."""

    NON_FINITE_LOSS = "non-finite loss"
    NON_FINITE_GRADIENT = "non-finite gradient"
    DRY_RUN = "dry run"
    NON_FINITE_UPDATE = "non-finite update (weights restored)"
    PROBE_DRIFT = "probe drift"  # a guard after the step (the training session's)


@dataclass
class StepResult:
    """What a step did. ``refusal`` says why nothing was applied (None when applied), and
    ``reason`` says it in words.

    loss: mean loss over the batch (SFT: per continuation token; ORPO/DPO: per pair).
    tokens: continuation tokens trained on. grad_norm: before clipping.
    update_norm: L2 norm of the applied change (0.0 if not applied; None if not measured).
    cache_hits: contexts whose state came from the context cache (exact or extended).
    metrics: loss-specific extras (mean log-odds ratio for ORPO, reward margin for DPO).
    """

    loss: float
    tokens: int
    grad_norm: float
    update_norm: float | None
    refusal: Refusal | None
    reason: str | None
    seconds: float
    cache_hits: int = 0
    examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def applied(self) -> bool:
        return self.refusal is None

    def refuse(self, refusal: Refusal, reason: str | None = None) -> None:
        """Mark the step as not applied (by a guard after it, which restored the weights)."""
        self.refusal, self.reason = refusal, reason or refusal.value


def _max_context_length(model: torch.nn.Module) -> int | None:
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)


def validate_examples(model: torch.nn.Module, examples: Sequence[Example], loss: LossKind) -> None:
    """Raise InvalidExampleError for the first example the step cannot train on."""
    if loss not in ("sft", "orpo", "dpo"):
        raise ValueError(f"loss must be 'sft', 'orpo' or 'dpo', got {loss!r}")
    if not examples:
        raise InvalidExampleError("no examples")
    vocab = model.get_input_embeddings().num_embeddings
    max_len = _max_context_length(model)
    want = SFTExample if loss == "sft" else PreferenceExample
    for i, ex in enumerate(examples):
        if not isinstance(ex, want):
            raise InvalidExampleError(f"example {i}: loss {loss!r} needs {want.__name__}, got {type(ex).__name__}")
        parts = {"context_ids": ex.context_ids}
        parts.update({"continuation_ids": ex.continuation_ids} if isinstance(ex, SFTExample)
                     else {"chosen_ids": ex.chosen_ids, "rejected_ids": ex.rejected_ids})
        for name, ids in parts.items():
            if not ids:
                raise InvalidExampleError(f"example {i}: {name} is empty")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidExampleError(f"example {i}: {name} holds token id {bad}, outside the "
                                          f"vocabulary [0, {vocab})")
            if name != "context_ids" and max_len is not None and len(ex.context_ids) + len(ids) > max_len:
                raise InvalidExampleError(f"example {i}: context + {name} is {len(ex.context_ids) + len(ids)} "
                                          f"tokens, over the model's context length {max_len}")
        if loss == "dpo" and (ex.ref_chosen_logp is None) != (ex.ref_rejected_logp is None):
            raise InvalidExampleError(f"example {i}: give both reference log-probs or neither")


def _ids(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def _frozen_context(model: torch.nn.Module, context: torch.Tensor,
                    cache: ContextCache | None) -> tuple[FrozenContext | None, bool]:
    """The frozen state after context[:-1] (None for a one-token context), and whether it was a cache hit."""
    if context.numel() == 1:
        return None, False
    if cache is None:
        return prefill(model, context[:-1]), False
    frozen, lookup = cache.get(model, context[:-1])
    return frozen, lookup.kind != "miss"


def _answer_logprobs(model: torch.nn.Module, frozen: FrozenContext | None, context: torch.Tensor,
                     answer: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [T] of `answer` ([T]) after the context, on the frozen state."""
    inputs = torch.cat([context[-1:], answer[:-1]])
    return token_logprobs(continuation_logits(model, frozen, inputs), answer)


def continuation_logprobs(model: torch.nn.Module, context_ids: Sequence[int], continuation_ids: Sequence[int],
                          context_cache: ContextCache | None = None) -> torch.Tensor:
    """Per-token log-probs [T_cont] (float32) of `continuation_ids` after `context_ids`. No grad."""
    device = model.get_input_embeddings().weight.device
    validate_examples(model, [SFTExample(tuple(context_ids), tuple(continuation_ids))], "sft")
    context, continuation = _ids(context_ids, device), _ids(continuation_ids, device)
    with torch.no_grad():
        frozen, _ = _frozen_context(model, context, context_cache)
        return _answer_logprobs(model, frozen, context, continuation)


def _trained_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def _example_loss(model, ex: Example, options: StepOptions, device, cache,
                  scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """The loss of one example times `scale`, plus its metrics (0-dim tensors) and whether its
    context was cached."""
    context = _ids(ex.context_ids, device)
    frozen, hit = _frozen_context(model, context, cache)
    if isinstance(ex, SFTExample):
        logp = _answer_logprobs(model, frozen, context, _ids(ex.continuation_ids, device))
        return -logp.sum() * scale, {}, hit
    chosen = _answer_logprobs(model, frozen, context, _ids(ex.chosen_ids, device))
    rejected = _answer_logprobs(model, frozen, context, _ids(ex.rejected_ids, device))
    if options.loss == "orpo":
        loss, log_odds = orpo_loss(chosen, rejected, options.orpo_lambda)
        return loss * scale, {"log_odds_ratio": log_odds}, hit
    if ex.ref_chosen_logp is None:
        # The reference is the current weights before the update: within this step they are
        # exactly the policy's, so its log-probs are the policy's, detached.
        ref_c, ref_r = chosen.detach().sum(), rejected.detach().sum()
    else:
        ref_c, ref_r = ex.ref_chosen_logp, ex.ref_rejected_logp
    loss, margin = dpo_loss(chosen, rejected, ref_c, ref_r, options.dpo_beta)
    return loss * scale, {"reward_margin": margin}, hit


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, examples: Sequence[Example],
               options: StepOptions | None = None, context_cache: ContextCache | None = None,
               before: Sequence[torch.Tensor] | None = None) -> StepResult:
    """Accumulate gradients over `examples`, then take one guarded optimizer step in place.

    The model runs in its current mode (train/eval); only the optimizer's parameters change.
    `before`: copies of the optimizer's parameters (in its param-group order) that the
    caller already took; then the update is measured against them instead of new copies.

    Raises InvalidExampleError before any computation if an example cannot be trained on.
    """
    options = options or StepOptions()
    validate_examples(model, examples, options.loss)
    start = time.perf_counter()
    device = model.get_input_embeddings().weight.device
    params = _trained_params(optimizer)
    optimizer.zero_grad(set_to_none=True)

    if options.loss == "sft":
        tokens = sum(len(ex.continuation_ids) for ex in examples)
        scale = 1.0 / tokens  # token-weighted mean NLL over the batch
    else:
        tokens = sum(len(ex.chosen_ids) + len(ex.rejected_ids) for ex in examples)
        scale = 1.0 / len(examples)
    factors = factored_weights(optimizer, tokens)

    # Gradients, accumulated over the batch.
    losses, hits, metric_values = [], 0, {}
    for ex in examples:
        with linear_seam(enabled=bool(factors)), recording_factors(factors):
            loss, ex_metrics, hit = _example_loss(model, ex, options, device, context_cache, scale)
        hits += hit
        for k, v in ex_metrics.items():
            metric_values.setdefault(k, []).append(v)
        loss.backward()
        losses.append(loss.detach())
    if factors is not None:
        factors.fold_into_grads()
    # One host sync for the batch's losses and metrics. An example whose loss is not finite
    # has run its backward too; the step is refused below and the gradients dropped.
    names = list(metric_values)
    rows = torch.stack([torch.stack(losses)] + [torch.stack(metric_values[k]) for k in names]).tolist()
    total_loss = sum(rows[0])
    metrics = {k: sum(row) / len(examples) for k, row in zip(names, rows[1:])}

    def result(loss: float, grad_norm: float, update_norm: float | None, refusal: Refusal | None) -> StepResult:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, tokens, grad_norm, update_norm, refusal, refusal and refusal.value,
                          time.perf_counter() - start, hits, len(examples), metrics)

    # Guards, then the update.
    if not math.isfinite(total_loss):
        return result(float("nan"), float("nan"), 0.0, Refusal.NON_FINITE_LOSS)
    grad_norms = gradient_norms(params, factors)
    grad_norm = combined_norm(list(grad_norms.values())).item()
    if not math.isfinite(grad_norm):
        return result(total_loss, grad_norm, 0.0, Refusal.NON_FINITE_GRADIENT)
    if options.dry_run:
        return result(total_loss, grad_norm, 0.0, Refusal.DRY_RUN)
    clip = None
    if options.max_grad_norm is not None and grad_norm > options.max_grad_norm:
        clip = options.max_grad_norm / (grad_norm + 1e-6)
    update_norm = apply_update(optimizer, params, lr=options.lr, clip=clip, grad_norms=grad_norms, factors=factors,
                               before=before, measure=options.measure_update,
                               max_update_norm=options.max_update_norm)
    if update_norm is not None and not math.isfinite(update_norm):
        return result(total_loss, grad_norm, 0.0, Refusal.NON_FINITE_UPDATE)
    if context_cache is not None:
        context_cache.note_update(update_norm)
    return result(total_loss, grad_norm, update_norm, None)
