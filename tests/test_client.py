"""What the Python client and `livetrain teach` post: a correction ("this answer was wrong,
this one is right") becomes a preference pair, trained with ORPO unless told otherwise."""

from __future__ import annotations

import json

import httpx
import pytest
from transformers import AutoTokenizer

from livetrain.cli import main
from livetrain.client import TrainingClient

PROMPT, WANTED, WRONG = "What is 2 + 2?", "2 + 2 = 4.", "2 + 2 is 5, I think."


@pytest.fixture
def posted(tokenizer_dir):
    """(client, bodies): a client whose every /train body is recorded and answered as applied."""
    bodies: list[dict] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"applied": True, "loss": 1.0, "tokens": 1})

    http = httpx.Client(base_url="http://livetrain.test", transport=httpx.MockTransport(answer))
    with TrainingClient(http_client=http, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir)) as client:
        yield client, bodies


def test_teach_posts_the_wanted_answer_as_sft(posted):
    client, bodies = posted
    client.teach(PROMPT, WANTED)
    (example,) = bodies[0]["examples"]
    assert bodies[0]["loss"] == "sft" and set(example) == {"context_ids", "continuation_ids"}


def test_teach_with_a_rejected_answer_posts_the_pair_as_orpo(posted):
    client, bodies = posted
    client.teach(PROMPT, WANTED)
    client.teach(PROMPT, WANTED, rejected=WRONG)
    sft, pair = bodies[0]["examples"][0], bodies[1]["examples"][0]
    assert bodies[1]["loss"] == "orpo"
    assert pair["context_ids"] == sft["context_ids"] and pair["chosen_ids"] == sft["continuation_ids"]
    assert client.tokenizer.decode(pair["rejected_ids"]).startswith(WRONG)


def test_teach_with_a_rejected_answer_takes_the_loss_it_is_given(posted):
    client, bodies = posted
    client.teach(PROMPT, WANTED, rejected=WRONG, loss="dpo", lr=1e-5)
    assert (bodies[0]["loss"], bodies[0]["lr"]) == ("dpo", 1e-5)


def test_livetrain_teach_rejected_passes_the_wrong_answer(monkeypatch, capsys, tokenizer_dir):
    calls = []

    def teach(self, prompt, completion, **options):
        calls.append((prompt, completion, options))
        return {"applied": True}

    monkeypatch.setattr(TrainingClient, "teach", teach)
    status = main(["teach", "--server", "http://127.0.0.1:1", "--tokenizer", str(tokenizer_dir),
                   "--prompt", PROMPT, "--completion", WANTED, "--rejected", WRONG])
    assert status == 0 and json.loads(capsys.readouterr().out) == {"applied": True}
    assert calls == [(PROMPT, WANTED, {"rejected": WRONG, "system": None, "dry_run": False})]
