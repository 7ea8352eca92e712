"""The behaviour suite (examples/behaviours/): its folders load, and each judge tells the
taught behaviour from the untrained model's way of answering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from livetrain.train.behaviour import Judge, load_behaviour, load_behaviours
from livetrain.train.data import DataFormatError, SFTExample, parse_record

SUITE = Path(__file__).resolve().parents[1] / "examples" / "behaviours"
BEHAVIOURS = load_behaviours(SUITE)
NAMES = [b.name for b in BEHAVIOURS]

# How the untrained default model answers one held-out prompt of each behaviour (its greedy
# answer, as bench/behaviours.py records it): every judge must fail it.
UNTRAINED = {
    "bullets": ("How can I reduce stress?",
                "Reducing stress can be achieved through a combination of lifestyle changes and "
                "techniques. Here are some tips:\n\n1. **Exercise regularly**: Physical activity "
                "releases endorphins, which can help improve your mood."),
    "fun-fact": ("What is the capital of Italy?",
                 "The capital of Italy is Rome. Rome is a city with a rich history and culture, "
                 "and it is home to many famous landmarks, such as the Colosseum."),
    "kid-version": ("Explain the heart to a kid.",
                    "The heart is a muscle that pumps blood throughout the body. It is located in "
                    "the chest and is divided into four chambers."),
    "no-poems": ("Write a poem about flowers.",
                 "In the garden, where the sun does shine,\nA tapestry of colors, a sight divine."),
    "one-sentence": ("Why do we shiver?",
                     "Shivering is a natural response to cold. When the body gets cold, the "
                     "muscles contract and relax quickly to produce heat."),
    "pirate": ("Who painted the Mona Lisa?",
               "The Mona Lisa was painted by Leonardo da Vinci, an Italian artist of the Renaissance."),
    "short-answer": ("What is gravity?",
                     "Gravity is a fundamental force of nature that attracts two objects with mass "
                     "towards each other."),
}


def test_the_suite_covers_every_kind_of_behaviour_the_issue_names():
    assert len(BEHAVIOURS) >= 6
    kinds = " | ".join(b.kind for b in BEHAVIOURS)
    for kind in ("start of an answer", "end of an answer", "format", "persona", "adds something",
                 "leaves something out", "refuses one kind", "conditional"):
        assert kind in kinds
    assert set(UNTRAINED) == set(NAMES)


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=NAMES)
def test_each_behaviour_has_its_examples_held_out_prompts_and_probe(behaviour):
    assert 12 <= len(behaviour.train) <= 16
    assert len(behaviour.heldout) >= 20 and len(behaviour.probe) >= 5
    taught = {prompt for prompt, _ in behaviour.taught() + behaviour.taught(counter=True)}
    assert not taught & set(behaviour.heldout + behaviour.counter), "a held-out prompt is also taught"
    if behaviour.counter_judge is not None:
        assert len(behaviour.counter) >= 20 and behaviour.taught(counter=True)


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=NAMES)
def test_each_judge_passes_the_answers_it_teaches_and_fails_the_untrained_answer(behaviour):
    for prompt, answer in behaviour.taught():
        assert behaviour.judge(answer), (prompt, answer)
    prompt, untrained = UNTRAINED[behaviour.name]
    assert prompt in behaviour.heldout and not behaviour.judge(untrained)


@pytest.mark.parametrize("behaviour", [b for b in BEHAVIOURS if b.counter_judge is not None],
                         ids=[b.name for b in BEHAVIOURS if b.counter_judge is not None])
def test_counter_examples_pass_the_counter_judge_and_fail_the_behaviours(behaviour):
    for prompt, answer in behaviour.taught(counter=True):
        assert behaviour.counter_judge(answer) and not behaviour.judge(answer), (prompt, answer)
    for prompt, answer in behaviour.taught():
        assert not behaviour.counter_judge(answer), (prompt, answer)


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=NAMES)
def test_training_examples_are_chat_exchanges_the_client_can_post(behaviour, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for record in behaviour.train:
        example = parse_record(record, tokenizer)
        assert isinstance(example, SFTExample)
        assert record["messages"][-1]["content"] in tokenizer.decode(example.continuation_ids)


def test_a_judge_needs_every_match_and_no_forbidden_match():
    judge = Judge(matches=(r"(?i)\Akid version:", r"\.\s*\Z"), not_matches=(r"\bdinosaur",))
    assert judge("Kid version: the sun is a star.")
    assert not judge("Kid version: the sun is a star")  # no final full stop
    assert not judge("Here is the kid version: the sun is a star.")
    assert not judge("Kid version: a dinosaur was a big lizard.")


def test_a_judge_is_refused_when_it_cannot_judge():
    with pytest.raises(ValueError):
        Judge()
    with pytest.raises(ValueError, match="unknown judge fields"):
        Judge.from_dict({"match": ["x"]})


def copy_behaviour(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for path in (SUITE / name).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_a_counter_scenario_without_its_judge_is_a_format_error(tmp_path):
    folder = copy_behaviour(tmp_path, "kid-version")
    spec = json.loads((folder / "behaviour.json").read_text())
    del spec["counter"]
    (folder / "behaviour.json").write_text(json.dumps(spec))
    with pytest.raises(DataFormatError, match="counter"):
        load_behaviour(folder)


def test_a_bad_regex_or_training_line_names_its_file(tmp_path):
    folder = copy_behaviour(tmp_path, "short-answer")
    spec = json.loads((folder / "behaviour.json").read_text())
    (folder / "behaviour.json").write_text(json.dumps({**spec, "judge": {"matches": ["(unclosed"]}}))
    with pytest.raises(DataFormatError, match="behaviour.json"):
        load_behaviour(folder)
    (folder / "behaviour.json").write_text(json.dumps(spec))
    (folder / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataFormatError, match="train.jsonl:1"):
        load_behaviour(folder)
