"""Training examples and their JSONL formats (TRL's field names), tokenized client-side
exactly as the served model sees them.

Formats, one JSON object per line:
  {"messages": [...]}                        the last assistant turn is the continuation
  {"prompt": P, "completion": C}             P, C: strings, or lists of chat messages
  {"prompt": P, "chosen": C, "rejected": R}  likewise; a preference pair
  {"context_ids": [...], "continuation_ids": [...]}                     raw token ids
  {"context_ids": [...], "chosen_ids": [...], "rejected_ids": [...],
   "ref_chosen_logp": x, "ref_rejected_logp": y}                         (refs optional)

From chat messages, the context is the chat template applied with the generation prompt
and the continuation is the rest of the whole conversation's template (the assistant's
answer and its end-of-turn tokens), so context + continuation is exactly the template of
the whole conversation. Plain-string completions get the tokenizer's EOS appended, as
TRL does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

__all__ = ["SFTExample", "PreferenceExample", "Example", "DataFormatError", "load_jsonl",
           "parse_record", "read_jsonl", "tokenize_chat", "tokenize_prompt_completion", "default_loss"]


@dataclass(frozen=True)
class SFTExample:
    """Learn to continue `context_ids` with `continuation_ids` (token ids)."""

    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]


@dataclass(frozen=True)
class PreferenceExample:
    """Prefer `chosen_ids` over `rejected_ids` after `context_ids`.

    ref_*_logp: the reference model's summed log-probs of each answer (DPO); None means
    "take them from the current weights before the update".
    """

    context_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None


Example = Union[SFTExample, PreferenceExample]


def default_loss(examples: Sequence[Example]) -> str:
    """The loss of a batch that names none: ORPO for preference pairs (the rejected answer
    is what the pair adds), SFT for completions."""
    return "orpo" if isinstance(examples[0], PreferenceExample) else "sft"


class DataFormatError(ValueError):
    """A training record is malformed. Names the field and, when read from a file, the
    file and line."""

    def __init__(self, field: str, message: str, path: str | None = None, line: int | None = None):
        self.field, self.reason, self.path, self.line = field, message, path, line
        where = f"{path}:{line}: " if path is not None else ""
        super().__init__(f"{where}field {field!r}: {message}")


def _check_messages(field: str, messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(field, "expected a non-empty list of chat messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise DataFormatError(f"{field}[{i}]", "expected {\"role\": str, \"content\": str}")
    return messages


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                              return_dict=True)["input_ids"])


def _split_chat(tokenizer, context: list[dict], answer: list[dict],
                field: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(context ids with generation prompt, the rest of the whole conversation's ids)."""
    if answer[0]["role"] != "assistant":
        raise DataFormatError(field, "the answer must start with an assistant message")
    context_ids = _chat_ids(tokenizer, context, add_generation_prompt=True)
    full_ids = _chat_ids(tokenizer, context + answer, add_generation_prompt=False)
    if full_ids[:len(context_ids)] != context_ids:
        raise DataFormatError(field, "the chat template renders the earlier turns differently once the "
                                     "answer is added; cannot split context from continuation")
    return tuple(context_ids), tuple(full_ids[len(context_ids):])


def tokenize_chat(tokenizer, messages: Sequence[dict]) -> SFTExample:
    """An SFT example from a conversation whose last message is the assistant's answer."""
    messages = _check_messages("messages", list(messages))
    if messages[-1]["role"] != "assistant":
        raise DataFormatError("messages", "the last message must be the assistant's answer")
    if len(messages) < 2:
        raise DataFormatError("messages", "need at least one message before the assistant's answer")
    context, continuation = _split_chat(tokenizer, messages[:-1], messages[-1:], "messages")
    return SFTExample(context, continuation)


def _text_ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _prompt_and_answers(tokenizer, prompt: Any,
                        answers: dict[str, Any]) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
    """Tokenize a prompt and one or more answers to it, all strings or all chat messages."""
    if isinstance(prompt, str):
        context = tuple(_text_ids(tokenizer, prompt, special=True))
        out = {}
        for field, answer in answers.items():
            if not isinstance(answer, str):
                raise DataFormatError(field, "expected a string, like the prompt")
            out[field] = tuple(_text_ids(tokenizer, answer, special=False) + [tokenizer.eos_token_id])
        return context, out
    prompt = _check_messages("prompt", prompt)
    context: tuple[int, ...] = ()
    out = {}
    for field, answer in answers.items():
        context, out[field] = _split_chat(tokenizer, prompt, _check_messages(field, answer), field)
    return context, out


def tokenize_prompt_completion(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> SFTExample:
    """An SFT example from a prompt and its completion (both strings or both chat messages)."""
    context, answers = _prompt_and_answers(tokenizer, prompt, {"completion": completion})
    return SFTExample(context, answers["completion"])


def _ids(record: dict, field: str) -> tuple[int, ...]:
    value = record[field]
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise DataFormatError(field, "expected a list of integer token ids")
    return tuple(value)


def _optional_float(record: dict, field: str) -> float | None:
    value = record.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise DataFormatError(field, "expected a number")
    return None if value is None else float(value)


def parse_record(record: Any, tokenizer=None) -> Example:
    """One training record (a decoded JSON object) -> an Example.

    `tokenizer` is needed for every format except raw token ids.
    """
    if not isinstance(record, dict):
        raise DataFormatError("<record>", "expected a JSON object")
    if "context_ids" in record:
        if "continuation_ids" in record:
            return SFTExample(_ids(record, "context_ids"), _ids(record, "continuation_ids"))
        missing = [f for f in ("chosen_ids", "rejected_ids") if f not in record]
        if missing:
            raise DataFormatError(missing[0], "missing (with context_ids, give continuation_ids, "
                                              "or chosen_ids and rejected_ids)")
        return PreferenceExample(_ids(record, "context_ids"), _ids(record, "chosen_ids"),
                                 _ids(record, "rejected_ids"), _optional_float(record, "ref_chosen_logp"),
                                 _optional_float(record, "ref_rejected_logp"))
    if tokenizer is None:
        raise DataFormatError("<record>", "text and chat records need a tokenizer")
    if "messages" in record:
        return tokenize_chat(tokenizer, record["messages"])
    if "prompt" not in record:
        raise DataFormatError("<record>", "expected one of: messages; prompt + completion; "
                                          "prompt + chosen + rejected; context_ids + continuation_ids; "
                                          "context_ids + chosen_ids + rejected_ids")
    if "completion" in record:
        return tokenize_prompt_completion(tokenizer, record["prompt"], record["completion"])
    missing = [f for f in ("chosen", "rejected") if f not in record]
    if missing:
        field = "completion" if len(missing) == 2 else missing[0]
        raise DataFormatError(field, "missing (with prompt, give completion, or chosen and rejected)")
    context, answers = _prompt_and_answers(tokenizer, record["prompt"],
                                           {"chosen": record["chosen"], "rejected": record["rejected"]})
    return PreferenceExample(context, answers["chosen"], answers["rejected"])


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, decoded value) of every non-blank line of a JSONL file.

    Raises DataFormatError naming the file and the line that is not valid JSON.
    """
    records: list[tuple[int, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataFormatError("<line>", f"not valid JSON ({e.msg})", str(path), number) from None
    return records


def load_jsonl(path: str | Path, tokenizer=None) -> list[Example]:
    """Read a JSONL file of training records (blank lines skipped).

    Raises DataFormatError naming the file, the line number and the field.
    """
    examples: list[Example] = []
    for number, record in read_jsonl(path):
        try:
            examples.append(parse_record(record, tokenizer))
        except DataFormatError as e:
            raise DataFormatError(e.field, e.reason, str(path), number) from None
    return examples
