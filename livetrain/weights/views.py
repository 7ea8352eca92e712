"""Hugging Face-named views of vLLM-shaped tensors, attached to a model skeleton.

The training worker never copies a weight: it builds the Hugging Face model on the
meta device and makes each parameter a view (``narrow`` along dim 0) of the shared
tensor that holds it, so an optimizer step writes straight into the weights vLLM serves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from livetrain.weights.layout import Layout, LayoutError


def hf_views(layout: Layout, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face name -> view into the vLLM-shaped tensor that holds it.

    ``tensors`` maps vLLM parameter names to their full tensors (shapes as in the
    layout). A view of rows ``[a, b)`` of a ``[N, ...]`` tensor is ``[b - a, ...]`` and
    shares its storage. Only full Hugging Face tensors are supported (tensor-parallel
    size 1). Tied names map to the same view object.
    """
    views: dict[str, torch.Tensor] = {}
    for name, param in layout.params.items():
        if name not in tensors:
            raise LayoutError(f"no tensor for vLLM parameter {name}")
        tensor = tensors[name]
        if tuple(tensor.shape) != param.shape:
            raise LayoutError(f"{name}: tensor shape {tuple(tensor.shape)}, layout says {param.shape}")
        for s in param.slices:
            hf_shape = layout.hf_shapes[s.hf_name]
            if s.hf_rows != (0, hf_shape[0]):
                raise LayoutError(f"{s.hf_name}: a shard (rows {s.hf_rows} of {hf_shape[0]}) is not a whole tensor")
            view = tensor.narrow(0, s.rows[0], s.rows[1] - s.rows[0])
            if tuple(view.shape) != hf_shape:
                raise LayoutError(f"{s.hf_name}: view {tuple(view.shape)} differs from its shape {hf_shape}")
            views[s.hf_name] = view
    for alias, target in layout.tied.items():
        views[alias] = views[target]
    return views


def build_skeleton(config) -> nn.Module:
    """A Hugging Face causal LM for ``config`` with every parameter on the meta device.

    Buffers (rotary frequencies) are real CPU tensors: they are computed, not stored.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return model


def attach_views(model: nn.Module, views: Mapping[str, torch.Tensor]) -> None:
    """Make every parameter of ``model`` the view of the same name (no copies).

    Names whose views are one tensor object (tied embeddings, see `hf_views`) get one
    shared ``nn.Parameter``, so an optimizer sees the tied weight once. Raises `LayoutError` if a parameter has no view or its shape or
    dtype would change, so a skeleton is never left half on the meta device.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    missing = [name for name in named if name not in views]
    if missing:
        raise LayoutError(f"no shared tensor for {len(missing)} parameters, e.g. {missing[:3]}")
    for name, param in named.items():
        if tuple(views[name].shape) != tuple(param.shape):
            raise LayoutError(f"{name}: view {tuple(views[name].shape)}, model wants {tuple(param.shape)}")
    made: dict[int, nn.Parameter] = {}  # id(view) -> its parameter, for tied names
    for name, param in named.items():
        replacement = made.get(id(views[name]))
        if replacement is None:
            replacement = nn.Parameter(views[name], requires_grad=param.requires_grad)
            made[id(views[name])] = replacement
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, replacement)


def model_on_views(config, layout: Layout, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A Hugging Face model for ``config`` whose parameters are views of ``tensors`` (vLLM-shaped)."""
    model = build_skeleton(config)
    attach_views(model, hf_views(layout, tensors))
    return model.eval()
