"""APOLLO and APOLLO-Mini learn as fast as AdamW on a toy task."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from livetrain.optim import Apollo, apollo_mini, apollo_param_groups

VOCAB, BRANCHES, STEPS, LR = 64, 4, 200, 3e-2
# Each token is followed by one of 4 tokens fixed per token: the best possible loss is ln 4.
NEXT_TOKENS = torch.stack([torch.randperm(VOCAB, generator=torch.Generator().manual_seed(t))[:BRANCHES]
                           for t in range(VOCAB)])  # (VOCAB, BRANCHES)


def sequences(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(n, length) token ids drawn from the fixed Markov chain."""
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=generator)
    for t in range(1, length):
        choice = torch.randint(0, BRANCHES, (n,), generator=generator)
        ids[:, t] = NEXT_TOKENS[ids[:, t - 1], choice]
    return ids


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False))


def held_out_loss_after_training(make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]) -> float:
    """Train the decoder (embeddings frozen, so the decoder weights must do the learning)."""
    model = tiny_llama()
    opt = make_optimizer(apollo_param_groups(model))
    data = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        ids = sequences(16, 32, data)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        ids = sequences(64, 32, torch.Generator().manual_seed(99))
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adamw_loss(one_thread) -> float:
    def adamw(groups: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=LR, weight_decay=0.0)

    loss = held_out_loss_after_training(adamw)
    assert loss < 0.5 * math.log(VOCAB)  # it learned: from ln 64 = 4.2 towards ln 4 = 1.4
    return loss


@pytest.mark.parametrize("make", [
    lambda groups: apollo_mini(groups, lr=LR),
    lambda groups: Apollo(groups, lr=LR, rank=16),  # rank below the hidden size of 64
], ids=["apollo-mini", "apollo-rank16"])
def test_reaches_a_loss_within_ten_percent_of_adamw(make, adamw_loss):
    assert held_out_loss_after_training(make) <= 1.10 * adamw_loss
