"""Parameter groups for Hugging Face causal LMs."""

from __future__ import annotations

import pytest
import torch

from livetrain.optim import Apollo, apollo_param_groups
from tests.tiny_models import build_tiny_model


def names(model: torch.nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_decoder_matrices_go_to_apollo_small_parameters_to_adamw_embeddings_frozen(arch):
    model = build_tiny_model(arch, tie_word_embeddings=False)
    groups = apollo_param_groups(model)
    apollo, adamw = groups
    assert all(p.dim() == 2 for p in apollo["params"])
    assert all(".layers." in n and n.endswith("proj.weight") for n in names(model, apollo["params"]))
    assert len(apollo["params"]) == 7 * 2  # q k v o gate up down, two layers
    assert adamw["rank"] is None and all(p.dim() == 1 for p in adamw["params"])
    assert "model.norm.weight" in names(model, adamw["params"])
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in names(model, adamw["params"])
    trained = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in trained), name
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.lm_head.weight.requires_grad


def test_target_modules_by_list_or_regex():
    model = build_tiny_model("llama")
    by_list = apollo_param_groups(model, target_modules=["q_proj", "v_proj"], other="frozen")
    by_regex = apollo_param_groups(model, target_modules=r"self_attn\.[qv]_proj", other="frozen")
    assert len(by_list) == len(by_regex) == 1
    assert names(model, by_list[0]["params"]) == names(model, by_regex[0]["params"]) == {
        f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad


def test_tied_embeddings_train_with_adamw_once_when_asked():
    model = build_tiny_model("llama", tie_word_embeddings=True)
    groups = apollo_param_groups(model, other="frozen", embeddings="adamw", other_lr=1e-4)
    embedding_group = groups[-1]
    assert embedding_group["params"] == [model.model.embed_tokens.weight]
    assert embedding_group["lr"] == 1e-4 and embedding_group["rank"] is None


def test_no_matching_target_is_an_error():
    with pytest.raises(ValueError, match="target_modules"):
        apollo_param_groups(build_tiny_model("llama"), target_modules=["no_such_proj"])


def test_groups_train_the_model_and_only_the_chosen_weights():
    model = build_tiny_model("qwen2")
    groups = apollo_param_groups(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Apollo(groups, lr=1e-2, rank=4)
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    trained = names(model, [p for g in groups for p in g["params"]])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name not in trained), name
