"""Deriving the layout from the loaded vLLM model's own mapping (no hand tables).

Every checkpoint tensor name is sent through the model class's ``hf_to_vllm_mapper``
(renames and, in recent vLLM, the stacking of q/k/v and gate/up) and its
``packed_modules_mapping`` (for classes whose stacking lives in ``load_weights``); the
position of the Hugging Face module in its packed list picks the shard, and the merged
layer's own ``output_sizes`` give the rows. Inverting that map gives, per vLLM
parameter, the Hugging Face tensors and rows it is made of.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from livetrain.formats.safetensors_layout import ModelLayout
from livetrain.weights import Layout, LayoutError, ParamLayout, ParamSlice
from livetrain.formats.dtypes import dtype_name


def derive_layout(model: nn.Module, model_dir: str, dtype: torch.dtype, tp_size: int = 1) -> Layout:
    """The layout of ``model`` (a loaded vLLM model) against the checkpoint in ``model_dir``.

    ``dtype`` is the served dtype. Raises `LayoutError` if a vLLM parameter is made of
    nothing in the checkpoint or the rows do not add up.
    """
    if tp_size != 1:
        raise LayoutError("layouts for tensor parallel > 1 are not designed yet")
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    params = dict(model.named_parameters())
    aliases = _tied_aliases(model)
    stored = ModelLayout.read(model_dir).tensors  # Hugging Face name -> where it is stored

    pieces: dict[str, list[tuple[int, str]]] = defaultdict(list)  # vLLM name -> (shard index, HF name)
    for hf_name in stored:
        vllm_name = mapper.map_name(hf_name) if mapper is not None else hf_name
        if vllm_name is None or vllm_name in aliases:
            continue  # dropped by the model, or a tied copy it does not load
        vllm_name = _stack(vllm_name, packed)
        if vllm_name not in params:
            continue  # e.g. rotary caches some checkpoints carry
        pieces[vllm_name].append((_shard_index(hf_name, vllm_name, packed), hf_name))

    missing = [name for name in params if name not in pieces]
    if missing:
        raise LayoutError(f"{len(missing)} vLLM parameters are in no checkpoint tensor, e.g. {missing[:3]}")

    layouts: dict[str, ParamLayout] = {}
    for name, param in params.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = _full_shape(module, attr, param)
        sizes = getattr(module, "output_sizes", None)
        slices = []
        for index, hf_name in sorted(pieces[name]):
            rows = stored[hf_name].shape[0]
            start = sum(sizes[:index]) if sizes is not None and len(pieces[name]) > 1 else 0
            if len(pieces[name]) > 1 and sizes[index] != rows:
                raise LayoutError(f"{hf_name}: {rows} rows, but shard {index} of {name} has {sizes[index]}")
            slices.append(ParamSlice(hf_name, (start, start + rows), (0, rows)))
        layouts[name] = ParamLayout(name, shape, dtype_name(dtype), tuple(slices))

    hf_shapes = {hf: stored[hf].shape for pieces_ in pieces.values() for _, hf in pieces_}
    tied = {alias: next(hf for _, hf in pieces[target]) for alias, target in aliases.items()}
    return Layout(layouts, hf_shapes, tied)


def _stack(vllm_name: str, packed: dict[str, list[str]]) -> str:
    """Rename a constituent module (``.q_proj.``) to its packed module (``.qkv_proj.``) if the mapper did not."""
    for packed_name, parts in packed.items():
        for part in parts:
            if f".{part}." in vllm_name:
                return vllm_name.replace(f".{part}.", f".{packed_name}.", 1)
    return vllm_name


def _shard_index(hf_name: str, vllm_name: str, packed: dict[str, list[str]]) -> int:
    hf_module, vllm_module = hf_name.split(".")[-2], vllm_name.split(".")[-2]
    if hf_module == vllm_module:
        return 0
    parts = packed.get(vllm_module)
    if not parts or hf_module not in parts:
        raise LayoutError(f"{hf_name} loads into {vllm_name}, but the model's packed_modules_mapping "
                          f"does not list {hf_module} under {vllm_module}")
    return parts.index(hf_module)


def _full_shape(module: nn.Module, attr: str, param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's unpacked shape: the CPU backend leaves linear weights as empty tensors."""
    if param.numel() == 0 and attr == "weight" and hasattr(module, "output_size_per_partition"):
        return (module.output_size_per_partition, module.input_size_per_partition)
    return tuple(param.shape)


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that are another parameter (a tied ``lm_head``) -> the name that is kept."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases
