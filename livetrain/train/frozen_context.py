"""The context-frozen forward pass.

A context is run once under `no_grad` and its state (attention keys/values, and for
hybrid models the convolution and recurrent states of the linear-attention layers) is
kept as a `FrozenContext`. A continuation then runs with grad on a *fork* of that
state: gradient reaches every weight the continuation tokens use (W_q included, which
decides what they attend to in the context), but nothing flows back into the context.

Why a fork: transformers' caches update in place. Attention layers concatenate (a new
tensor each time, harmless), but linear-attention layers `copy_` their new conv and
recurrent states into the tensors they read a moment before. Under autograd those
tensors are saved for backward, so the in-place write breaks `backward()`; and it
would overwrite the frozen state that the next continuation (the rejected answer of a
preference pair, a cache hit) needs. A fork's layers share the frozen tensors but
rebind on update instead of copying in, so the frozen state is never written.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

from livetrain.train.compute_dtype import model_compute
from livetrain.train.frozen_attention import frozen_context_attention

__all__ = ["FrozenContext", "prefill", "continuation_logits"]


def _rebind_recurrent_state(layer: LinearAttentionCacheLayerMixin, recurrent_states: torch.Tensor,
                            state_idx: int = 0, **kwargs) -> torch.Tensor:
    """`update_recurrent_state` that rebinds the layer's state instead of copying into it."""
    layer.recurrent_states[state_idx] = recurrent_states
    layer.is_recurrent_states_initialized[state_idx] = True
    return recurrent_states


def _fork_layer(layer):
    forked = copy.copy(layer)
    # Per-state dicts (conv_states, recurrent_states, flags) are rebound per fork.
    for name, value in vars(layer).items():
        if isinstance(value, dict):
            setattr(forked, name, dict(value))
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        # `record_past` makes the conv-state update rebind (keep the full window) and keeps
        # single-token continuations off the fused decode kernel, which writes in place.
        forked.record_past = True
        forked.update_recurrent_state = types.MethodType(_rebind_recurrent_state, forked)
    return forked


def _refreeze_layer(layer) -> None:
    """Turn a fork's layer back into a plain frozen layer (after a no-grad extension)."""
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        for idx, conv in layer.conv_states.items():
            if conv is not None:
                layer.conv_states[idx] = conv[..., -layer.conv_kernel_size[idx]:]
        layer.record_past = False
        del layer.update_recurrent_state


@dataclass(eq=False)
class FrozenContext:
    """The model's state after `length` context tokens, computed without grad.

    Users never write to it: every forward pass on top of it goes through `fork()`.
    """

    cache: Cache
    length: int

    def fork(self) -> Cache:
        """A cache that shares this context's tensors and rebinds (never writes) on update."""
        forked = copy.copy(self.cache)
        forked.layers = [_fork_layer(layer) for layer in self.cache.layers]
        return forked

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (what a `ContextCache` budgets)."""
        seen: set[int] = set()
        total = 0
        for layer in self.cache.layers:
            tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
            for name in ("conv_states", "recurrent_states"):
                tensors.extend(getattr(layer, name, {}).values())
            for t in tensors:
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total


@torch.no_grad()
def prefill(model: torch.nn.Module, prefix_ids: torch.Tensor,
            base: FrozenContext | None = None) -> FrozenContext:
    """Run `prefix_ids` ([T] token ids) without grad; return the frozen state after them.

    With `base`, `prefix_ids` are the tokens that follow `base`'s context: the result is
    the state after both, and `base` itself is left untouched.
    """
    cache = base.fork() if base is not None else None
    # One logit row is the least the model computes; the prefill needs none.
    with model_compute(model):
        out = model(input_ids=prefix_ids.view(1, -1), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    cache = out.past_key_values
    if cache is None:
        raise RuntimeError("the model returned no cache for the context; gradient checkpointing in training "
                           "mode turns caching off (call model.gradient_checkpointing_disable())")
    if base is not None:
        for layer in cache.layers:
            _refreeze_layer(layer)
    start = base.length if base is not None else 0
    return FrozenContext(cache=cache, length=start + prefix_ids.numel())


def continuation_logits(model: torch.nn.Module, frozen: FrozenContext | None,
                        input_ids: torch.Tensor) -> torch.Tensor:
    """Logits for `input_ids` ([T]) run on top of `frozen` (or from scratch if None).

    Runs with whatever grad mode the caller is in; the frozen state is only read. With grad,
    attention computes no key/value gradient for the frozen context (see `frozen_attention`).
    A half-precision model computes in fp32 where the CPU lacks native support for it
    (`compute_dtype`), here and in `prefill`.
    Returns [T, V] logits in float32 (the loss is computed in fp32 whatever the model's dtype).
    """
    ids = input_ids.view(1, -1)
    with model_compute(model):
        if frozen is None:
            logits = model(input_ids=ids, use_cache=False).logits
        else:
            with frozen_context_attention(model):
                logits = model(input_ids=ids, past_key_values=frozen.fork(), use_cache=True).logits
    # squeeze, not [0]: its backward is a view, where indexing's fills a [1, T, V] zeros tensor.
    return logits.squeeze(0).float()
