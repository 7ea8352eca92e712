"""Offline `livetrain train DATA.jsonl --model DIR`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from livetrain.train.data import DataFormatError
from livetrain.checkpoint import DirectoryInUse
from livetrain.session import TrainingSession
from livetrain.session.offline import train_offline
from tests.session_helpers import CHATS, files_digest


def write_chats(path, chats=CHATS):
    with open(path, "w") as f:
        for prompt, answer in chats:
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def test_offline_train_writes_a_new_generation_that_transformers_reloads(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir()
    original = {k: v.clone() for k, v in load_file(model_dir / "model.safetensors").items()}
    summary = train_offline(write_chats(tmp_path / "chats.jsonl"), model_dir, epochs=2, batch_size=2,
                            lr=1e-3, progress=False)
    assert (summary.steps, summary.applied, summary.examples) == (4, 4, 8)
    assert summary.tokens > 0 and summary.last_loss < summary.first_loss
    assert summary.sync["generation"] == 1 and summary.sync["bytes_written"] > 0
    assert "4 steps (4 applied)" in summary.format()

    reloaded = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    for name, before in original.items():
        if name not in reloaded:
            continue
        changed = not torch.equal(reloaded[name].detach(), before)
        assert changed == name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                         "o_proj.weight")), name
    metrics = [json.loads(line) for line in (model_dir / ".livetrain" / "metrics.jsonl").open()]
    assert [m["event"] for m in metrics] == ["step"] * 4 + ["sync"]
    assert (model_dir / ".livetrain" / "optimizer.pt").exists()


def test_offline_dry_run_changes_nothing(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir()
    digest = files_digest(model_dir)
    summary = train_offline(write_chats(tmp_path / "chats.jsonl"), model_dir, dry_run=True, progress=False)
    assert summary.applied == 0 and summary.refusals == {"dry run": 4} and summary.sync is None
    assert files_digest(model_dir) == digest
    assert not (model_dir / ".livetrain" / "metrics.jsonl").exists()
    assert not (model_dir / ".livetrain" / "optimizer.pt").exists()


def test_offline_train_names_a_malformed_line_before_loading_the_model(tiny_model_dir, tmp_path):
    data = write_chats(tmp_path / "chats.jsonl")
    with open(data, "a") as f:
        f.write('{"prompt": "hi"}\n')
    with pytest.raises(DataFormatError, match=r"chats.jsonl:5: "):
        train_offline(data, tiny_model_dir(), progress=False)


def test_offline_train_refuses_a_directory_in_use(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir()
    with TrainingSession.open(model_dir, holder="livetrain serve (training worker)"):
        with pytest.raises(DirectoryInUse, match="livetrain serve"):
            train_offline(write_chats(tmp_path / "chats.jsonl"), model_dir, progress=False)


def test_preference_pairs_train_with_orpo_when_no_loss_is_named(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": prompt}],
                                        "chosen": [{"role": "assistant", "content": answer}],
                                        "rejected": [{"role": "assistant", "content": "I do not know."}]}) + "\n"
                            for prompt, answer in CHATS))
    model_dir = tiny_model_dir()
    summary = train_offline(data, model_dir, lr=1e-3, progress=False)
    assert (summary.steps, summary.applied) == (4, 4)
    steps = [json.loads(line) for line in (model_dir / ".livetrain" / "metrics.jsonl").open()][:4]
    assert {step["loss_kind"] for step in steps} == {"orpo"}
