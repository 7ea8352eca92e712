"""How `livetrain serve` shares the cores between vLLM and the training worker."""

from __future__ import annotations

import pytest

from livetrain.cpus import CoreLayout, CoreSplitError, core_layout, format_cpus, parse_cpus


def test_core_lists_parse_and_format():
    assert parse_cpus("0-3,6") == {0, 1, 2, 3, 6}
    assert parse_cpus("5") == {5}
    assert format_cpus({6, 0, 2}) == "0,2,6"
    assert parse_cpus(format_cpus({1, 4, 7})) == {1, 4, 7}


def test_trainer_cores_give_the_trainer_the_last_cores_at_normal_priority_and_vllm_the_others():
    one = core_layout(1, [0, 1])
    assert one == CoreLayout(frozenset({0}), frozenset({1}))
    assert one.trainer_threads == 1 and not one.trainer_idle
    two = core_layout(2, [3, 0, 1, 2])
    assert two == CoreLayout(frozenset({0, 1}), frozenset({2, 3}))
    assert two.trainer_threads == 2 and not two.trainer_idle
    # The cores this process may use, not 0..n-1.
    assert core_layout(1, [2, 5, 7]) == CoreLayout(frozenset({2, 5}), frozenset({7}))
    assert core_layout(1, [0, 1]).describe() == "vLLM on cores 0; trainer 1 thread(s) on cores 1"


def test_by_default_or_on_one_core_vllm_binds_itself_and_the_trainer_takes_idle_cycles():
    idle = CoreLayout(vllm_cores=None, trainer_cores=None)
    assert idle.trainer_threads == 1 and idle.trainer_idle
    assert core_layout(0, [0, 1]) == idle
    assert core_layout(1, [4]) == idle
    assert core_layout(0, [0, 1]).describe() == "vLLM on its own binding; trainer 1 thread on idle cycles of any core"


def test_leaving_vllm_no_core_or_a_negative_count_is_refused():
    with pytest.raises(CoreSplitError, match="leave vLLM none of the 2 cores"):
        core_layout(2, [0, 1])
    with pytest.raises(CoreSplitError, match="negative"):
        core_layout(-1, [0, 1])
