"""Parameter groups of a Hugging Face causal LM for `Apollo`.

Three kinds of parameters:
- targets: 2-D weights inside the decoder layers whose module name matches
  `target_modules` → APOLLO (their moments are tiny);
- norms and biases (every parameter with fewer than 2 dimensions) → plain AdamW, or
  frozen (`other`);
- the input and output embeddings → plain AdamW, or frozen (`embeddings`). AdamW state
  for them is two more copies of the largest matrix of a small model: frozen by default.
Everything else (untargeted decoder weights) is frozen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

# `model.layers.3.` (Llama, Qwen, Mistral, Gemma...) or `transformer.h.3.` (GPT-2 style).
DECODER_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.\d+\.")
Treatment = Literal["adamw", "frozen"]


def apollo_param_groups(model: nn.Module, target_modules: str | Sequence[str] | None = None,
                        other: Treatment = "adamw", embeddings: Treatment = "frozen",
                        other_lr: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups for `Apollo(groups, ...)`; sets `requires_grad` to match.

    Args:
        model: a causal LM whose decoder layers are named `...layers.<i>.` or `...h.<i>.`.
        target_modules: which decoder weights APOLLO trains, by module name: a regex
            searched in the name (`r"self_attn\\.(q|v)_proj"`), or a list of names or name
            suffixes (`["q_proj", "v_proj"]`). None: every 2-D decoder weight.
        other: "adamw" or "frozen" for norms and biases.
        embeddings: "adamw" or "frozen" for the input/output embeddings.
        other_lr: learning rate of the AdamW groups (None: the optimizer's).

    Returns: `[{"params": targets}]`, then `{"params": ..., "rank": None,
    "weight_decay": 0.0}` AdamW groups where chosen. Raises ValueError when no
    parameter matches `target_modules`, or on an unknown treatment.
    """
    for name, treatment in (("other", other), ("embeddings", embeddings)):
        if treatment not in ("adamw", "frozen"):
            raise ValueError(f"{name} must be 'adamw' or 'frozen', got {treatment!r}")
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                     for p in m.parameters(recurse=False)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        embedding_ids |= {id(p) for p in output.parameters(recurse=False)}

    targets: list[nn.Parameter] = []
    small: list[nn.Parameter] = []
    embedding: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if id(p) in embedding_ids:
            chosen = embedding if embeddings == "adamw" else None
        elif p.dim() < 2:
            chosen = small if other == "adamw" else None
        elif DECODER_LAYER.search(name) and _matches(name.rsplit(".", 1)[0], target_modules):
            chosen = targets
        else:
            chosen = None
        p.requires_grad_(chosen is not None)
        if chosen is not None:
            chosen.append(p)
    if not targets:
        raise ValueError(f"no 2-D decoder weight matches target_modules={target_modules!r}")

    adamw = {"rank": None, "weight_decay": 0.0}
    if other_lr is not None:
        adamw["lr"] = other_lr
    return [{"params": targets}] + [{"params": params, **adamw}
                                    for params in (small, embedding) if params]


def _matches(module_name: str, target_modules: str | Sequence[str] | None) -> bool:
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.search(target_modules, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in target_modules)

