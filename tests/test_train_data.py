"""Training data: chat tokenization that matches serving exactly, JSONL formats, errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from livetrain.train import (DataFormatError, PreferenceExample, SFTExample, load_jsonl, parse_record,
                             tokenize_chat)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def template_ids(tokenizer, messages, add_generation_prompt=False) -> tuple[int, ...]:
    return tuple(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               add_generation_prompt=add_generation_prompt)["input_ids"])


def test_chat_context_plus_continuation_is_the_whole_conversation_template(tokenizer):
    ex = tokenize_chat(tokenizer, CONVERSATION)
    assert ex.context_ids + ex.continuation_ids == template_ids(tokenizer, CONVERSATION)
    assert ex.context_ids == template_ids(tokenizer, CONVERSATION[:-1], add_generation_prompt=True)
    answer = tokenizer.decode(ex.continuation_ids)
    assert answer.startswith("Rome.") and "<|im_end|>" in answer  # answer, then end of turn
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ex.continuation_ids


def test_all_jsonl_formats_load(tokenizer, tmp_path):
    records = [
        {"messages": CONVERSATION},
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"prompt": CONVERSATION[:2], "completion": [CONVERSATION[2]]},
        {"prompt": "Sky colour:", "chosen": " blue", "rejected": " green"},
        {"prompt": CONVERSATION[:2], "chosen": [CONVERSATION[2]], "rejected": [{"role": "assistant", "content": "Lyon."}]},
        {"context_ids": [1, 2, 3], "continuation_ids": [4, 5]},
        {"context_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4], "ref_chosen_logp": -1.5,
         "ref_rejected_logp": -2},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    examples = load_jsonl(path, tokenizer)
    assert [type(e) for e in examples] == [SFTExample] * 3 + [PreferenceExample] * 2 + [SFTExample, PreferenceExample]
    assert examples[1].continuation_ids[-1] == tokenizer.eos_token_id  # as TRL appends it
    assert examples[2] == tokenize_chat(tokenizer, CONVERSATION[:3])
    assert examples[4].context_ids == examples[2].context_ids
    assert tokenizer.decode(examples[4].rejected_ids).startswith("Lyon.")
    assert examples[5] == SFTExample((1, 2, 3), (4, 5))
    assert examples[6] == PreferenceExample((1, 2), (3,), (4,), -1.5, -2.0)


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "a"}', "completion"),
    ('{"context_ids": [1, "x"], "continuation_ids": [2]}', "context_ids"),
    ('{"context_ids": [1], "chosen_ids": [2]}', "rejected_ids"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "messages"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "messages[0]"),
    ('{"prompt": "a", "chosen": "b", "rejected": ["c"]}', "rejected"),
    ('{"prompt": "a", "completion": "b"', "<line>"),
    ('{"text": "a"}', "<record>"),
])
def test_malformed_line_error_names_file_line_and_field(tokenizer, tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context_ids": [1], "continuation_ids": [2]}\n' + line + "\n")
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path, tokenizer)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, field)
    assert str(info.value).startswith(f"{path}:2: field {field!r}")


def test_raw_ids_need_no_tokenizer():
    assert parse_record({"context_ids": [1], "continuation_ids": [2]}) == SFTExample((1,), (2,))
    with pytest.raises(DataFormatError, match="need a tokenizer"):
        parse_record({"prompt": "a", "completion": "b"})
