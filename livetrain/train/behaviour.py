"""Checking a taught behaviour: a pass check on answers, and evaluation helpers on a
Hugging Face model (greedy answers to held-out prompts, held-out loss, drift on probes).

The example behaviour (examples/restate/): every answer starts by restating the topic,
"You asked about <topic>." The pass check is a plain function of the answer text, so a
client can apply it to answers served over HTTP as well.

A behaviour set folder holds
  train.jsonl    {"messages": [...]}: the conversations to teach
  heldout.jsonl  {"prompt": [messages], "completion": [assistant message]}: prompts not
                 trained on, with a reference answer (for the held-out loss)
  probe.jsonl    {"text": ...}: ordinary texts whose perplexity shows drift
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from livetrain.train.data import SFTExample, load_jsonl
from livetrain.train.step import continuation_logprobs

__all__ = ["RESTATE_PREFIX", "restates_request", "BehaviourSet", "load_behaviour_set", "greedy_answers",
           "pass_rate", "heldout_loss", "probe_perplexity"]

RESTATE_PREFIX = "You asked about"


def restates_request(answer: str) -> bool:
    """True when the answer opens with "You asked about" (leading spaces and quotes ignored)."""
    return answer.lstrip(" \t\n\"'").lower().startswith(RESTATE_PREFIX.lower())


@dataclass
class BehaviourSet:
    train: list[SFTExample]
    heldout_prompts: list[list[dict]]   # chat messages, ending with the user's turn
    heldout: list[SFTExample]           # held-out prompts with their reference answers
    probe_texts: list[str]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_behaviour_set(folder: str | Path, tokenizer) -> BehaviourSet:
    """Read a behaviour set folder (see the module docstring), tokenized with `tokenizer`."""
    folder = Path(folder)
    return BehaviourSet(
        train=load_jsonl(folder / "train.jsonl", tokenizer),
        heldout_prompts=[row["prompt"] for row in _read_jsonl(folder / "heldout.jsonl")],
        heldout=load_jsonl(folder / "heldout.jsonl", tokenizer),
        probe_texts=[row["text"] for row in _read_jsonl(folder / "probe.jsonl")],
    )


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer, prompts: Sequence[list[dict]], max_new_tokens: int = 24,
                   batch_size: int = 10) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) to chat prompts, in batches."""
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer.apply_chat_template(list(prompts[start:start + batch_size]), add_generation_prompt=True,
                                                  padding=True, return_tensors="pt", return_dict=True)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def pass_rate(answers: Sequence[str], check: Callable[[str], bool] = restates_request) -> float:
    """Fraction of answers that pass `check`."""
    return sum(map(check, answers)) / len(answers)


def heldout_loss(model: torch.nn.Module, examples: Sequence[SFTExample]) -> float:
    """Mean NLL per continuation token over `examples`."""
    logps = [continuation_logprobs(model, ex.context_ids, ex.continuation_ids) for ex in examples]
    return -torch.cat(logps).mean().item()


def probe_perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str]) -> float:
    """Perplexity over the probe texts: exp(mean NLL of every token after the first)."""
    logps = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        logps.append(continuation_logprobs(model, ids[:1], ids[1:]))
    return math.exp(-torch.cat(logps).mean().item())
