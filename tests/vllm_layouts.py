"""The layout vLLM is expected to use for a Hugging Face model, written out as the spec.

vLLM merges q | k | v rows into ``qkv_proj`` (weights and Qwen2's biases) and gate | up
into ``gate_up_proj``, pads the vocabulary to a multiple of 64, and keeps a tied
``lm_head`` as the embedding itself. Tests compare the layout derived inside vLLM with
this one, and use it to pack synthetic tensors in vLLM's order.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from livetrain.weights import Layout, ParamLayout, ParamSlice
from livetrain.formats.dtypes import dtype_name

MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
VOCAB_PAD = 64


def expected_layout(model: nn.Module, dtype: torch.dtype | None = None) -> Layout:
    """vLLM's layout for a Hugging Face Llama/Qwen2/Qwen3 model (tensor-parallel size 1)."""
    state = {name: p for name, p in model.named_parameters()}  # tied lm_head appears once, as the embedding
    tied = model.config.tie_word_embeddings
    params: dict[str, ParamLayout] = {}
    hf_shapes = {name: tuple(p.shape) for name, p in state.items()}
    done = set()
    for name, tensor in state.items():
        if name in done:
            continue
        match = re.match(r"(.*)\.(\w+)\.(weight|bias)$", name)
        prefix, module, kind = match.groups() if match else ("", "", "")
        merged = next((m for m, parts in MERGED.items() if module in parts), None)
        if merged:
            parts = [f"{prefix}.{part}.{kind}" for part in MERGED[merged]]
            slices, row = [], 0
            for part in parts:
                n = state[part].shape[0]
                slices.append(ParamSlice(part, (row, row + n), (0, n)))
                row += n
                done.add(part)
            shape = (row, *tensor.shape[1:])
            vllm_name = f"{prefix}.{merged}.{kind}"
        else:
            rows = tensor.shape[0]
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                rows = -(-rows // VOCAB_PAD) * VOCAB_PAD
            slices = [ParamSlice(name, (0, tensor.shape[0]), (0, tensor.shape[0]))]
            shape = (rows, *tensor.shape[1:])
            vllm_name = name
            done.add(name)
        params[vllm_name] = ParamLayout(vllm_name, tuple(shape), dtype_name(dtype or tensor.dtype), tuple(slices))
    return Layout(params, hf_shapes, {"lm_head.weight": "model.embed_tokens.weight"} if tied else {})


def pack_like_vllm(layout: Layout, hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vLLM-shaped copies of ``hf_tensors`` (padding rows zero), one per layout parameter."""
    packed = {}
    for name, param in layout.params.items():
        first = hf_tensors[param.slices[0].hf_name]
        out = torch.zeros(param.shape, dtype=first.dtype)
        for s in param.slices:
            out[s.rows[0]:s.rows[1]] = hf_tensors[s.hf_name][s.hf_rows[0]:s.hf_rows[1]]
        packed[name] = out
    return packed


def write_vllm_tiny_model(out, arch: str, tokenizer_dir, seed: int = 0):
    """A tiny random bf16 model directory that vLLM's CPU backend can serve.

    vLLM's CPU attention needs a head size of 32 or more, so this is hidden 128 with two
    heads of 64 and one KV head (Qwen2 biases random, so their packing is visible).
    """
    import shutil

    import transformers

    from tests.tiny_models import TINY_ARCHS, VOCAB_SIZE

    config_cls, model_cls, _ = TINY_ARCHS[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, num_hidden_layers=2, tie_word_embeddings=True,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.02)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out
