"""A step torn by a crash is undone by whoever maps the weights next; a kept step stays."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

from livetrain.weights import create_shared_copy, open_shared_copy, remove_shared_copy
from livetrain.weights.step_undo import MARK_FILE, StepUndo, last_kept_state, take_undo_report, undo_torn_step
from livetrain.worker.main import served_model
from livetrain.options import TrainerOptions
from livetrain.session import TrainingSession
from tests.session_helpers import example
from tests.tiny_models import build_tiny_model
from tests.vllm_layouts import expected_layout


def live_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 8, generator=generator),
            "b": torch.randn(3, 5, generator=generator).to(torch.bfloat16)}


def test_a_torn_step_is_undone_bit_for_bit(tmp_path):
    live = live_tensors()
    original = {n: t.clone() for n, t in live.items()}
    undo = StepUndo(live, tmp_path)
    undo.begin(7)
    live["a"].add_(1.0)  # the crash comes after the first tensor was stepped
    assert undo_torn_step(tmp_path, live) == {"weights_version": 7, "tensors": 2}
    assert all(torch.equal(live[n], original[n]) for n in live)
    assert not (tmp_path / MARK_FILE).exists()
    assert undo_torn_step(tmp_path, live) is None  # only once
    assert take_undo_report(tmp_path) == {"weights_version": 7, "tensors": 2}
    assert take_undo_report(tmp_path) is None


def test_a_kept_step_stays_even_if_its_mark_was_not_cleared(tmp_path):
    live = live_tensors()
    undo = StepUndo(live, tmp_path)
    undo.begin(1)
    live["a"].add_(1.0)
    undo.end(kept_state=b"state after step 1")
    stepped = live["a"].clone()
    undo.begin(2)
    live["b"].add_(1.0)
    # Killed after the state of step 2 was written, before its mark went: step 2 was kept.
    undo.keep_state(2, b"state after step 2")
    assert undo_torn_step(tmp_path, live) is None
    assert torch.equal(live["a"], stepped) and not (tmp_path / MARK_FILE).exists()
    assert last_kept_state(tmp_path) == b"state after step 2"
    assert sorted(p.name for p in tmp_path.glob("state-*")) == ["state-2.pt"]


def test_undo_refuses_copies_that_do_not_fit(tmp_path):
    live = live_tensors()
    StepUndo(live, tmp_path).begin(1)
    other = {"a": torch.zeros(4, 8), "b": torch.zeros(3, 6, dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match="does not fit"):
        undo_torn_step(tmp_path, other)
    assert torch.equal(other["a"], torch.zeros(4, 8))  # nothing written
    assert (tmp_path / MARK_FILE).exists()


def test_in_memory_undo_restores_without_files(tmp_path):
    live = live_tensors()
    original = live["b"].clone()
    undo = StepUndo(live)
    undo.begin(1)
    live["b"].mul_(3)
    undo.restore()
    undo.end(kept_state=b"ignored")
    assert torch.equal(live["b"], original) and not any(tmp_path.iterdir())


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_then_die_mid_step(model_dir: Path, shared: Path, digest_file: Path) -> None:
    """One kept step, then a step killed (SIGKILL) after half its tensors were written."""
    torch.set_num_threads(1)
    session = TrainingSession.open(model_dir, TrainerOptions(lr=1e-2), model=served_model(model_dir, shared),
                                   live_state_dir=shared)
    assert session.train([example(0)]).applied
    digest_file.write_text(weights_digest(session.model))
    params = [p for group in session.optimizer.param_groups for p in group["params"]]

    def torn_step(closure=None, **kwargs):
        with torch.no_grad():
            for p in params[: len(params) // 2]:
                p.add_(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    session.optimizer.step = torn_step
    session.train([example(1)])


def test_worker_killed_mid_step_is_undone_and_resumes(tiny_model_dir):
    model_dir = tiny_model_dir("llama", dtype=torch.bfloat16)
    layout = expected_layout(build_tiny_model("llama").to(torch.bfloat16))
    shared = Path(f"/dev/shm/livetrain-test-torn-{os.getpid()}")
    create_shared_copy(model_dir, layout, shared)
    digest_file = model_dir.parent / "after-step-1.sha256"
    try:
        child = multiprocessing.get_context("spawn").Process(
            target=train_then_die_mid_step, args=(model_dir, shared, digest_file))
        child.start()
        child.join(120)
        assert child.exitcode == -signal.SIGKILL
        _, tensors = open_shared_copy(shared)
        assert (shared / MARK_FILE).read_text() == "2"  # the torn step is visible before recovery
        session = TrainingSession.open(model_dir, model=served_model(model_dir, shared), live_state_dir=shared)
        try:
            assert session.torn_step == {"weights_version": 2, "tensors": len(session.trainable)}
            assert session.status()["torn_step_undone"] == session.torn_step
            assert weights_digest(session.model) == digest_file.read_text()  # exactly after step 1
            assert session.weights_version == 1 and session.steps_applied == 1
            assert session.optimizer_state == "restored (1 steps)"
            assert session.optimizer.state  # the moments of step 1 came back
            assert session.train([example(2)]).weights_version == 2
        finally:
            session.close()
        events = [line for line in (model_dir / ".livetrain" / "metrics.jsonl").read_text().splitlines()
                  if "torn_step_undone" in line]
        assert len(events) == 1
    finally:
        remove_shared_copy(shared)


def test_a_removed_directory_does_not_stop_the_steps(tmp_path):
    live = live_tensors()
    directory = tmp_path / "copy"
    directory.mkdir()
    undo = StepUndo(live, directory)
    for path in directory.iterdir():  # what a server stopping at once does to the shared copy
        path.unlink()
    directory.rmdir()
    undo.begin(1)
    live["a"].add_(1.0)
    undo.end(kept_state=b"state")
    undo.begin(2)
    live["a"].add_(1.0)
    undo.restore()
    undo.end()
    assert torch.equal(live["a"], live_tensors()["a"] + 1.0) and not directory.exists()
