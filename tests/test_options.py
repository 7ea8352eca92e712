"""TrainerOptions: checked on construction, and the same on both sides of the worker's command line."""

from __future__ import annotations

import argparse

import pytest

from livetrain.options import DEFAULT_WARMUP_STEPS, InvalidOptions, TrainerOptions


def parse(argv: list[str]) -> TrainerOptions:
    parser = argparse.ArgumentParser()
    TrainerOptions.add_arguments(parser)
    return TrainerOptions.from_args(parser.parse_args(argv))


def test_flags_round_trip_through_the_workers_command_line():
    options = TrainerOptions(optimizer="apollo", train_modules="q_proj", lr=2e-4, sync_interval_s=5.0,
                             warmup_steps=3, max_probe_drift=0.25)
    assert parse(options.to_argv()) == options
    assert parse(TrainerOptions().to_argv()) == TrainerOptions() == parse([])


def test_warmup_factor_ramps_linearly_then_holds():
    assert [TrainerOptions(warmup_steps=4).warmup_factor(n) for n in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert TrainerOptions(warmup_steps=0).warmup_factor(0) == 1
    assert TrainerOptions().warmup_steps == DEFAULT_WARMUP_STEPS


@pytest.mark.parametrize("fields, message", [
    ({"warmup_steps": -1}, "warmup steps must be 0 or more"),
    ({"lr": 0.0}, "learning rate must be in"),
    ({"optimizer": "sgd"}, "unknown optimizer 'sgd'"),
])
def test_unusable_values_are_refused_with_the_reason(fields, message):
    with pytest.raises(InvalidOptions, match=message):
        TrainerOptions(**fields)
