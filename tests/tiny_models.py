"""Tiny randomly initialised causal LMs built from configs, for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_SIZE = 49152  # the default model's tokenizer, so chat templates are real
COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1,
              eos_token_id=2, pad_token_id=2)
TINY_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),          # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),  # q/k norms
}


def build_tiny_model(arch: str, num_layers: int = 2, tie_word_embeddings: bool = True,
                     seed: int = 0) -> torch.nn.Module:
    """A random fp32 model of the given family: hidden 64, 4 heads (2 KV), 49152 tokens."""
    import transformers

    config_cls, model_cls, extra = TINY_ARCHS[arch]
    config = getattr(transformers, config_cls)(num_hidden_layers=num_layers,
                                               tie_word_embeddings=tie_word_embeddings,
                                               **COMMON, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    if arch == "qwen2":  # biases start at zero; make them visible to layout tests
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(std=0.02)
    return model.eval()


def write_tiny_model(out: Path, arch: str, dtype: torch.dtype = torch.float32, num_layers: int = 2,
                     tie_word_embeddings: bool = True, seed: int = 0) -> Path:
    """Save a tiny model as a Hugging Face directory (config.json + model.safetensors)."""
    model = build_tiny_model(arch, num_layers, tie_word_embeddings, seed).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out)
    return out
