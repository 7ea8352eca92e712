"""The `livetrain` command: what a person types and sees."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from livetrain.cli import main


def read_weights(model_dir) -> dict:
    """A copy of the directory's tensors (load_file may map the file, which syncs rewrite)."""
    return {name: t.clone() for name, t in load_file(model_dir / "model.safetensors").items()}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("model", "train", "teach", "serve", "demo", "checkpoint"):
        assert command in out


def test_offline_train_then_checkpoint_log_verify_and_rollback(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir()
    before = read_weights(model_dir)
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{"prompt": "Say hi.", "completion": "Hi there!"},
                       {"messages": [{"role": "user", "content": "Name a colour."},
                                     {"role": "assistant", "content": "Blue."}]}])

    status, out, _ = run(capsys, "train", str(data), "--model", str(model_dir), "--lr", "1e-2")
    assert status == 0 and "2 applied" in out and "generation 1" in out
    after = read_weights(model_dir)
    changed = [n for n in before if not before[n].equal(after[n])]
    assert changed and all("self_attn" in n for n in changed)

    status, out, _ = run(capsys, "checkpoint", "log", str(model_dir))
    assert status == 0 and [g["generation"] for g in json.loads(out)] == [1]
    status, out, _ = run(capsys, "checkpoint", "verify", str(model_dir))
    assert status == 0 and json.loads(out)["ok"] is True
    status, out, _ = run(capsys, "checkpoint", "rollback", str(model_dir), "--to", "0")
    assert status == 0 and json.loads(out)["generation"] == 0
    restored = read_weights(model_dir)
    assert all(before[n].equal(restored[n]) for n in before)


def test_a_malformed_line_is_one_clear_error_and_changes_nothing(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir()
    weights = (model_dir / "model.safetensors").read_bytes()
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok", "completion": "fine"}\n{"prompt": 3}\n')
    status, out, err = run(capsys, "train", str(data), "--model", str(model_dir))
    assert status == 2
    assert "livetrain train: error:" in err and "bad.jsonl:2" in err and "completion" in err
    assert "Traceback" not in err
    assert (model_dir / "model.safetensors").read_bytes() == weights


def test_train_needs_a_model_or_a_server(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"prompt": "a", "completion": "b"}])
    status, _, err = run(capsys, "train", str(data))
    assert status == 2 and "--model DIR" in err and "--server URL" in err


def test_rollback_to_an_unknown_generation_is_refused(tiny_model_dir, capsys):
    model_dir = tiny_model_dir()
    status, _, err = run(capsys, "checkpoint", "rollback", str(model_dir), "--to", "7")
    assert status == 2 and "generation 7" in err
