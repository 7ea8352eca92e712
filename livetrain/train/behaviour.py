"""Checking a taught behaviour: pass checks on answers, the behaviour suite's folders, and
evaluation helpers on a Hugging Face model (greedy answers to held-out prompts, held-out
loss, drift on probes).

The demo's behaviour (examples/restate/): every answer starts by restating the topic,
"You asked about <topic>." A pass check is a plain function of the answer text, so a
client can apply it to answers served over HTTP as well.

A behaviour set folder (examples/restate/) holds
  train.jsonl    {"messages": [...]}: the conversations to teach
  heldout.jsonl  {"prompt": [messages], "completion": [assistant message]}: prompts not
                 trained on, with a reference answer (for the held-out loss)
  probe.jsonl    {"text": ...}: ordinary texts whose perplexity shows drift

A behaviour of the suite (examples/behaviours/<name>/, `load_behaviour`) holds
  behaviour.json {"kind", "description", "judge": JUDGE, "counter": {"description",
                 "judge": JUDGE}}; "counter" only for a behaviour that must hold back
                 somewhere (a conditional one, a refusal of one kind of request).
                 JUDGE: {"matches": [regex, ...], "not_matches": [regex, ...]}
  train.jsonl    {"messages": [user turn, assistant turn]}: the answers to teach; a line
                 with "counter": true is a counter-example (where the behaviour must not show)
  heldout.jsonl  {"prompt": "..."}: user turns not trained on, where the behaviour must show
  counter.jsonl  {"prompt": "..."}: user turns of the counter-scenario (with "counter" only)
  probe.jsonl    {"text": ...}: ordinary texts whose log-probs should not move
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from livetrain.train.data import DataFormatError, SFTExample, load_jsonl, read_jsonl
from livetrain.train.step import continuation_logprobs

__all__ = ["RESTATE_PREFIX", "restates_request", "Judge", "Behaviour", "load_behaviour", "load_behaviours",
           "BehaviourSet", "load_behaviour_set", "greedy_answers", "pass_rate", "heldout_loss", "probe_perplexity"]

RESTATE_PREFIX = "You asked about"


def restates_request(answer: str) -> bool:
    """True when the answer opens with "You asked about" (leading spaces and quotes ignored)."""
    return answer.lstrip(" \t\n\"'").lower().startswith(RESTATE_PREFIX.lower())


@dataclass(frozen=True)
class Judge:
    """Passes an answer when every ``matches`` regex is found in it (``re.search``) and no
    ``not_matches`` one is. Flags go inline: ``(?i)`` ignores case, ``\\A``/``\\Z`` anchor
    to the whole answer."""

    matches: tuple[str, ...] = ()
    not_matches: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.matches and not self.not_matches:
            raise ValueError("a judge needs at least one regex")
        for pattern in self.matches + self.not_matches:
            re.compile(pattern)  # a bad pattern fails here, not at the first answer

    def __call__(self, answer: str) -> bool:
        return (all(re.search(p, answer) for p in self.matches)
                and not any(re.search(p, answer) for p in self.not_matches))

    @classmethod
    def from_dict(cls, spec: dict) -> "Judge":
        unknown = set(spec) - {"matches", "not_matches"}
        if unknown:
            raise ValueError(f"unknown judge fields {sorted(unknown)}; a judge has matches and not_matches")
        return cls(tuple(spec.get("matches", ())), tuple(spec.get("not_matches", ())))


@dataclass(frozen=True)
class Behaviour:
    """One behaviour of the suite (see the module docstring for its folder).

    ``train``: training records ({"messages": [user, assistant]}, counter-examples marked
    "counter": true), in the order they are taught. ``heldout``/``counter``: user turns.
    ``counter_judge`` and ``counter`` are set together or not at all.
    """

    name: str
    kind: str
    description: str
    judge: Judge
    train: list[dict]
    heldout: list[str]
    probe: list[str]
    counter_judge: Judge | None = None
    counter: list[str] = field(default_factory=list)

    def taught(self, counter: bool = False) -> list[tuple[str, str]]:
        """(user turn, wanted answer) of the training examples where the behaviour must show
        (``counter`` False) or must not (True)."""
        return [(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in self.train
                if bool(r.get("counter")) == counter]


def load_behaviour(folder: str | Path) -> Behaviour:
    """Read one behaviour of the suite from its folder. Raises DataFormatError naming the
    file and the field when something is missing or malformed."""
    folder = Path(folder)
    spec_path = folder / "behaviour.json"
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    try:
        judge = Judge.from_dict(spec["judge"])
        counter_spec = spec.get("counter")
        counter_judge = None if counter_spec is None else Judge.from_dict(counter_spec["judge"])
        kind, description = spec["kind"], spec["description"]
    except (KeyError, ValueError, re.error) as error:
        raise DataFormatError(str(error), "missing or malformed", str(spec_path)) from None
    numbered = read_jsonl(folder / "train.jsonl")
    train = [record for _, record in numbered]
    for number, record in numbered:
        messages = record.get("messages")
        if not (isinstance(messages, list) and len(messages) == 2
                and [m.get("role") for m in messages] == ["user", "assistant"]):
            raise DataFormatError("messages", "expected a user turn and the assistant's answer",
                                  str(folder / "train.jsonl"), number)
    counter_path = folder / "counter.jsonl"
    counter = [row["prompt"] for row in _read_jsonl(counter_path)] if counter_path.exists() else []
    if bool(counter) != (counter_judge is not None):
        raise DataFormatError("counter", "counter.jsonl and the counter judge go together", str(spec_path))
    return Behaviour(name=folder.name, kind=kind, description=description, judge=judge, train=train,
                     heldout=[row["prompt"] for row in _read_jsonl(folder / "heldout.jsonl")],
                     probe=[row["text"] for row in _read_jsonl(folder / "probe.jsonl")],
                     counter_judge=counter_judge, counter=counter)


def load_behaviours(root: str | Path) -> list[Behaviour]:
    """Every behaviour under ``root`` (each folder with a behaviour.json), by name."""
    return [load_behaviour(spec.parent) for spec in sorted(Path(root).glob("*/behaviour.json"))]


@dataclass
class BehaviourSet:
    train: list[SFTExample]
    heldout_prompts: list[list[dict]]   # chat messages, ending with the user's turn
    heldout: list[SFTExample]           # held-out prompts with their reference answers
    probe_texts: list[str]


def _read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in read_jsonl(path)]


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
