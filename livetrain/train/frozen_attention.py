"""Attention for a continuation that runs with grad on a frozen context.

Each attention layer of the continuation sees S keys: first the frozen context's cached
ones (no grad), then its own T. Under SDPA, transformers repeats the keys and values of a
grouped-query model once per query head (and autograd keeps the copies for backward),
and the kernel's backward computes the gradient of all S keys and values, which the
cache's concatenation then drops for all but the last T. This attention computes the
same outputs with the query heads that share a key head stacked together (no copies),
and in backward computes dP = dO·Vᵀ and dQ = dS·K over all S keys but dK and dV over the
T new ones only.

It keeps the attention probabilities for backward when they take no more memory than
the repeated keys and values SDPA would keep; otherwise (long continuations, models
without grouped queries) it keeps only the softmax's log-normaliser and recomputes the
probabilities in backward, in blocks of query positions, like a flash kernel.

`continuation_logits` runs a forward on a `FrozenContext` inside
`frozen_context_attention(model)`: only there are the first S − T keys a frozen context,
whose gradient is not wanted. Calls this attention does not cover go to transformers' SDPA
unchanged: no grad, dropout, logit soft-capping, attention sinks, additive masks, and
tensors off the CPU (where SDPA has fused kernels; this path is measured on CPU only).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["frozen_context_attention"]

IMPLEMENTATION = "livetrain_frozen_context"
# Scratch memory for the recomputed scores and their gradient, per block of queries.
_BLOCK_BYTES = 32 << 20


def _scores(query: torch.Tensor, key: torch.Tensor, hidden: torch.Tensor | None, first: int) -> torch.Tensor:
    """fp32 scores [B, KV, G·t, S] of scaled queries [B, KV, G, t, D] over keys [B, KV, S, D];
    -inf where `hidden` ([B|1, 1, t, S − first], True = hidden) hides key `first` + j."""
    b, kv, g, t, d = query.shape
    scores = torch.matmul(query.reshape(b, kv, g * t, d), key.transpose(-1, -2)).float()
    if hidden is not None:
        scores.view(b, kv, g, t, -1)[..., first:].masked_fill_(hidden.unsqueeze(2), -math.inf)
    return scores


class _FrozenPrefixAttention(torch.autograd.Function):
    """softmax(Q·Kᵀ, masked)·V for scaled queries Q [B, KV, G, T, D] (the G query heads of each
    key head), keys and values [B, KV, S, D]; `hidden`, `first` as in `_scores`. Backward gives
    no gradient to the first S − T keys and values. `block`: None keeps the probabilities for
    backward; else the number of query positions per block, whose probabilities backward
    recomputes."""

    @staticmethod
    def forward(ctx, query, key, value, hidden, first, block):
        b, kv, g, t, _ = query.shape
        out = query.new_empty(b, kv, g, t, value.shape[-1])
        if block is None:
            probs = torch.softmax(_scores(query, key, hidden, first), dim=-1)
            torch.matmul(probs.to(value.dtype), value, out=out.view(b, kv, g * t, -1))
            ctx.save_for_backward(query, key, value, hidden, out, probs)
        else:
            lse = query.new_empty(b, kv, g, t, 1, dtype=torch.float32)  # log-sum-exp of each row
            for rows in _blocks(t, block):
                scores = _scores(query[:, :, :, rows], key, _rows(hidden, rows), first)
                lse[:, :, :, rows] = torch.logsumexp(scores, dim=-1, keepdim=True).view_as(lse[:, :, :, rows])
                probs = scores.sub_(lse[:, :, :, rows].flatten(2, 3)).exp_().to(value.dtype)
                out[:, :, :, rows] = torch.matmul(probs, value).view_as(out[:, :, :, rows])
            ctx.save_for_backward(query, key, value, hidden, out, lse)
        ctx.first, ctx.block = first, block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, hidden, out, saved = ctx.saved_tensors
        b, kv, g, t, d = query.shape
        new = key.shape[2] - t  # the continuation's own keys start here
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        grad_q = torch.empty_like(query) if need_q else None
        grad_k = key.new_zeros(key.shape) if need_k else None
        grad_v = value.new_zeros(value.shape) if need_v else None
        for rows in _blocks(t, ctx.block or t):
            q_rows = query[:, :, :, rows].flatten(2, 3)                       # [B, KV, G·t, D]
            grad_out_rows = grad_out[:, :, :, rows].flatten(2, 3)             # [B, KV, G·t, Dv]
            if ctx.block is None:
                probs = saved
            else:
                probs = _scores(query[:, :, :, rows], key, _rows(hidden, rows), ctx.first)
                probs = probs.sub_(saved[:, :, :, rows].flatten(2, 3)).exp_()
            if need_v:
                grad_v[:, :, new:] += torch.matmul(probs[..., new:].transpose(-1, -2).to(value.dtype), grad_out_rows)
            # dS = P ∘ (dP − rowsum(dO ∘ O)), dP = dO·Vᵀ
            delta = (grad_out_rows.float() * out[:, :, :, rows].flatten(2, 3).float()).sum(-1, keepdim=True)
            grad_probs = torch.matmul(grad_out_rows, value.transpose(-1, -2)).float()
            grad_scores = grad_probs.sub_(delta).mul_(probs).to(key.dtype)
            if need_q:
                grad_q[:, :, :, rows] = torch.matmul(grad_scores, key).view_as(grad_q[:, :, :, rows])
            if need_k:
                grad_k[:, :, new:] += torch.matmul(grad_scores[..., new:].transpose(-1, -2), q_rows)
        return grad_q, grad_k, grad_v, None, None, None


def _blocks(length: int, block: int) -> Iterator[slice]:
    return (slice(start, min(start + block, length)) for start in range(0, length, block))


def _rows(hidden: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if hidden is None else hidden[:, :, rows]


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query [B, H, T, D], key/value [B, KV, S, D]
    (the frozen context's keys first), SDPA's mask (bool [B|1, 1, T, S] or None).
    Returns ([B, T, H, Dv], None)."""
    wants_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if (not wants_grad or query.device.type != "cpu" or dropout > 0 or kwargs.get("softcap") is not None
            or kwargs.get("s_aux") is not None or (attention_mask is not None and attention_mask.dtype != torch.bool)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    b, h, t, d = query.shape
    kv, s = key.shape[1], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # Masking only the keys some query cannot see: after a frozen context, T − 1 of them.
    if attention_mask is not None:
        hidden = ~attention_mask
        seen_by_all = ~hidden.any(dim=-2).flatten(0, -2).any(dim=0)  # [S]
        first = s if bool(seen_by_all.all()) else int(torch.argmin(seen_by_all.to(torch.uint8)))
        hidden = hidden[..., first:] if first < s else None
    elif t > 1 and is_causal:  # SDPA's None: causal, aligned to the last key
        first = s - t
        hidden = torch.ones(t, t, dtype=torch.bool, device=query.device).triu_(1).view(1, 1, t, t)
    else:
        first, hidden = s, None
    scaling = d ** -0.5 if scaling is None else scaling
    # Keep the probabilities (4·T bytes per head and key) if SDPA would keep more: the keys
    # and values repeated per query head (2·D elements per head and key).
    keep = h > kv and 4 * t <= 2 * d * key.element_size()
    block = None if keep else max(1, _BLOCK_BYTES // (8 * b * h * s))
    grouped = (query * scaling).reshape(b, kv, h // kv, t, d)  # query head i uses key head i // (H / KV)
    out = _FrozenPrefixAttention.apply(grouped, key, value, hidden, first, block)
    return out.view(b, h, t, -1).transpose(1, 2), None


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextmanager
def frozen_context_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within it, `model`'s SDPA attention runs this module's attention (other implementations
    are left as they are). Only for a forward on a frozen context's cache."""
    config = model.config.get_text_config(decoder=True)
    saved = config._attn_implementation
    if saved != "sdpa":
        yield
        return
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = saved
