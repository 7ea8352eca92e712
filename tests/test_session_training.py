"""TrainingSession: one owner per directory, guarded steps, persistent optimizer state,
checkpoint sync, rollback, metrics."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from livetrain.train.step import InvalidExampleError, StepOptions
from livetrain.checkpoint import DirectoryInUse
from livetrain.options import DEFAULT_TRAIN_MODULES, TrainerOptions
from livetrain.session import ProbeGuard, TrainingSession, load_model
from tests.session_helpers import example, files_digest


def trained(session: TrainingSession) -> dict[str, torch.Tensor]:
    params = dict(session.model.named_parameters())
    return {name: params[name].detach().clone() for name in session.trainable}


def test_default_trains_the_attention_projections_only(tiny_model_dir):
    with TrainingSession.open(tiny_model_dir()) as session:
        assert session.train_modules == DEFAULT_TRAIN_MODULES
        assert sorted({name.split(".")[-2] for name in session.trainable}) == \
            ["k_proj", "o_proj", "q_proj", "v_proj"]
        frozen = [n for n, p in session.model.named_parameters() if not p.requires_grad]
        assert any("mlp" in n for n in frozen) and any("embed" in n for n in frozen)


def test_train_modules_pattern_selects_what_is_trained(tiny_model_dir):
    model_dir = tiny_model_dir()
    with TrainingSession.open(model_dir, TrainerOptions(train_modules="q_proj")) as session:
        assert session.trainable == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    with pytest.raises(ValueError, match="no 2-D decoder weight matches"):
        TrainingSession.open(model_dir, TrainerOptions(train_modules="no_such_module"))


def test_lock_refuses_a_second_session_with_a_clear_message(tiny_model_dir):
    model_dir = tiny_model_dir()
    with TrainingSession.open(model_dir, holder="livetrain serve (training worker)"):
        with pytest.raises(DirectoryInUse, match=r"in use by livetrain serve \(training worker\) \(pid \d+"):
            TrainingSession.open(model_dir)
    with TrainingSession.open(model_dir):  # released on close
        pass


def test_applied_step_changes_only_the_trained_tensors_and_names_them(tiny_model_dir):
    with TrainingSession.open(tiny_model_dir(), TrainerOptions(optimizer="adamw")) as session:
        before = {n: p.detach().clone() for n, p in session.model.named_parameters()}
        report = session.train([example(0), example(1)])
        assert report.applied and report.weights_version == 1
        assert report.changed_tensors == session.trainable
        for name, param in session.model.named_parameters():
            assert torch.equal(param, before[name]) != (name in session.trainable), name
        assert session.status()["dirty_since_sync"]


def test_dry_run_changes_nothing(tiny_model_dir):
    model_dir = tiny_model_dir()
    digest = files_digest(model_dir)
    with TrainingSession.open(model_dir) as session:
        before = trained(session)
        report = session.train([example(0)], StepOptions(dry_run=True))
        assert not report.applied and report.reason == "dry run" and report.loss > 0
        assert report.changed_tensors == [] and report.weights_version == 0
        assert all(torch.equal(before[n], t) for n, t in trained(session).items())
    assert files_digest(model_dir) == digest
    assert not (model_dir / ".livetrain" / "optimizer.pt").exists()


def test_invalid_example_is_refused_before_any_computation(tiny_model_dir):
    with TrainingSession.open(tiny_model_dir()) as session:
        before = trained(session)
        with pytest.raises(InvalidExampleError, match="outside the vocabulary"):
            session.train([type(example(0))((1, 2, 3), (10**9,))])
        assert all(torch.equal(before[n], t) for n, t in trained(session).items())
        assert session.weights_version == 0


def test_logprobs_agree_with_the_sft_loss(tiny_model_dir):
    with TrainingSession.open(tiny_model_dir()) as session:
        ex = example(3)
        logprobs = session.logprobs(ex.context_ids, ex.continuation_ids)
        assert len(logprobs) == len(ex.continuation_ids)
        loss = session.train([ex], StepOptions(dry_run=True)).loss
        assert -sum(logprobs) / len(logprobs) == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["apollo-mini", "adamw"])
def test_optimizer_state_resumes_after_reopen(tiny_model_dir, tmp_path, optimizer):
    """Two steps, close, reopen, one step == three steps in one session, bit for bit."""
    resumed_dir = tiny_model_dir()
    straight_dir = tmp_path / "straight"
    shutil.copytree(resumed_dir, straight_dir)
    steps = [[example(0)], [example(1)], [example(2)]]  # distinct contexts: no cache hits

    with TrainingSession.open(straight_dir, TrainerOptions(optimizer=optimizer)) as session:
        for batch in steps:
            session.train(batch)
        expected = trained(session)

    with TrainingSession.open(resumed_dir, TrainerOptions(optimizer=optimizer)) as session:
        for batch in steps[:2]:
            session.train(batch)
    with TrainingSession.open(resumed_dir, TrainerOptions(optimizer=optimizer)) as session:
        assert session.optimizer_state == "restored (2 steps)"
        assert session.weights_version == 2
        session.train(steps[2])
        for name, tensor in trained(session).items():
            assert torch.equal(tensor, expected[name]), name


def test_optimizer_state_for_another_optimizer_is_not_loaded(tiny_model_dir):
    model_dir = tiny_model_dir()
    with TrainingSession.open(model_dir, TrainerOptions(optimizer="adamw")) as session:
        session.train([example(0)])
    with TrainingSession.open(model_dir, TrainerOptions(optimizer="apollo-mini")) as session:
        assert session.optimizer_state.startswith("new (the saved state is for adamw")


def test_close_syncs_a_new_generation_and_logs_metrics(tiny_model_dir):
    model_dir = tiny_model_dir()
    digest = files_digest(model_dir)
    with TrainingSession.open(model_dir) as session:
        session.train([example(0)])
        weights = trained(session)
    assert files_digest(model_dir) != digest
    with TrainingSession.open(model_dir) as session:
        assert not session.status()["dirty_since_sync"]
        for name, tensor in trained(session).items():
            assert torch.equal(tensor, weights[name]), name
        assert len(session.generations()) >= 1
    events = [json.loads(line)["event"] for line in (model_dir / ".livetrain" / "metrics.jsonl").open()]
    assert events == ["step", "sync"]


def test_rollback_restores_files_and_live_weights_and_resets_the_optimizer(tiny_model_dir):
    model_dir = tiny_model_dir()
    with TrainingSession.open(model_dir) as session:
        session.train([example(0)])
        first = session.sync()["generation"]
        after_first = trained(session)
        digest_first = files_digest(model_dir)
        session.train([example(1)])
        session.sync()
        assert files_digest(model_dir) != digest_first
        result = session.rollback(first)
        assert result["optimizer_state"] == "reset"
        assert set(session.trainable) <= set(result["changed_tensors"])
        for name, tensor in trained(session).items():
            assert torch.equal(tensor, after_first[name]), name
        assert files_digest(model_dir) == digest_first
        assert session.optimizer_state == "reset by rollback"


def first_step_size(session: TrainingSession, before: dict[str, torch.Tensor]) -> float:
    """The largest change of any trained weight: Adam's first step moves each by about lr."""
    return max((tensor - before[name]).abs().max().item() for name, tensor in trained(session).items())


def test_warmup_ramps_the_lr_of_a_fresh_optimizer_state(tiny_model_dir):
    model_dir = tiny_model_dir()
    options = TrainerOptions(optimizer="adamw", lr=1e-3, warmup_steps=4)
    with TrainingSession.open(model_dir, options) as session:
        before = trained(session)
        reports = [session.train([example(i)]) for i in range(5)]
        assert [r.lr for r in reports] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
        assert session.train([example(5)], StepOptions(lr=2e-3)).lr == pytest.approx(2e-3)  # a step's own lr
        session.rollback(0)  # a fresh optimizer state warms up again
        before = trained(session)
        report = session.train([example(0)])
        assert report.lr == pytest.approx(2.5e-4)
        assert first_step_size(session, before) == pytest.approx(2.5e-4, rel=0.01)
        metrics = [json.loads(line) for line in (model_dir / ".livetrain" / "metrics.jsonl").read_text().splitlines()]
        assert [m["lr"] for m in metrics if m["event"] == "step"][-1] == pytest.approx(2.5e-4)
    with TrainingSession.open(model_dir, options) as session:  # the saved state resumes its warmup
        assert session.train([example(1)]).lr == pytest.approx(5e-4)


def test_without_warmup_the_first_step_runs_at_the_full_lr(tiny_model_dir):
    with TrainingSession.open(tiny_model_dir(), TrainerOptions(optimizer="adamw", lr=1e-3, warmup_steps=0)) as session:
        before = trained(session)
        assert session.train([example(0)]).lr == pytest.approx(1e-3)
        assert first_step_size(session, before) == pytest.approx(1e-3, rel=0.01)


def probe_guard(max_drift: float) -> ProbeGuard:
    ex = example(20, context_len=4, continuation_len=24)
    return ProbeGuard(ex.context_ids, ex.continuation_ids, max_drift)


def test_a_step_that_moves_the_probe_too_far_is_undone_with_its_optimizer_state(tiny_model_dir):
    with TrainingSession.open(tiny_model_dir(), probe=probe_guard(1e-9)) as session:
        before = trained(session)
        state = copy.deepcopy(session.optimizer.state_dict())
        report = session.train([example(0)])
        assert not report.applied and "probe text" in report.reason and report.probe_drift != 0
        # Undone, but its values were in the weights for a moment: the serving side refreshes.
        assert report.weights_version == 0 and report.changed_tensors == session.trainable
        assert all(torch.equal(before[n], t) for n, t in trained(session).items())
        assert session.optimizer.state_dict()["state"].keys() == state["state"].keys()
        assert not session.status()["dirty_since_sync"]
        assert session.train([example(1)]).lr == report.lr  # the undone step did not count in the warmup


def test_an_injected_huge_update_is_undone_by_the_probe(tiny_model_dir, monkeypatch):
    model_dir = tiny_model_dir()
    model = load_model(model_dir)
    with torch.no_grad():  # sharpen the random model's near-uniform outputs, so weights matter
        model.get_input_embeddings().weight.mul_(100.0)
    with TrainingSession.open(model_dir, model=model, probe=probe_guard(0.5)) as session:
        assert session.train([example(0)], StepOptions(lr=1e-5)).applied  # an ordinary step passes
        before = trained(session)
        step = session.optimizer.step

        def huge_step(*args, **kwargs):  # finite, but 100x every trained weight
            step(*args, **kwargs)
            with torch.no_grad():
                for group in session.optimizer.param_groups:
                    torch._foreach_mul_(group["params"], 100.0)

        monkeypatch.setattr(session.optimizer, "step", huge_step)
        report = session.train([example(1)])
        assert not report.applied and abs(report.probe_drift) > 0.5
        assert all(torch.equal(before[n], t) for n, t in trained(session).items())


def test_an_injected_non_finite_update_is_not_applied(tiny_model_dir, monkeypatch):
    with TrainingSession.open(tiny_model_dir()) as session:
        before = trained(session)
        step = session.optimizer.step

        def poisoned_step(*args, **kwargs):
            step(*args, **kwargs)
            with torch.no_grad():
                next(iter(session.optimizer.param_groups[0]["params"])).view(-1)[0] = float("nan")

        session.train([example(1)])  # the optimizer has state to protect
        before = trained(session)
        state_before = copy.deepcopy(session.optimizer.state_dict())
        monkeypatch.setattr(session.optimizer, "step", poisoned_step)
        report = session.train([example(0)])
        assert not report.applied and "non-finite update" in report.reason
        assert all(torch.equal(before[n], t) for n, t in trained(session).items())
        assert report.weights_version == 1 and report.changed_tensors == session.trainable
        assert_same_state(session.optimizer.state_dict(), state_before)
        monkeypatch.undo()
        assert session.train([example(0)]).applied


def assert_same_state(actual, expected) -> None:
    """Optimizer state dicts equal value for value (tensors bit for bit)."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same_state(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same_state(a, e)
    else:
        assert actual == expected
