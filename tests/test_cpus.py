"""How `livetrain serve` shares the cores between vLLM and the training worker."""

from __future__ import annotations

import pytest

from livetrain.cpus import CoreSplitError, format_cpus, parse_cpus, split_cores


def test_core_lists_parse_and_format():
    assert parse_cpus("0-3,6") == {0, 1, 2, 3, 6}
    assert parse_cpus("5") == {5}
    assert format_cpus({6, 0, 2}) == "0,2,6"
    assert parse_cpus(format_cpus({1, 4, 7})) == {1, 4, 7}


def test_the_trainer_takes_the_last_cores_and_vllm_the_others():
    assert split_cores(1, [0, 1]) == ({0}, {1})
    assert split_cores(2, [3, 0, 1, 2]) == ({0, 1}, {2, 3})
    assert split_cores(1, [2, 5, 7]) == ({2, 5}, {7})  # the cores this process may use, not 0..n-1


def test_no_trainer_cores_or_one_core_means_shared_and_leaving_vllm_nothing_is_refused():
    assert split_cores(0, [0, 1]) == ({0, 1}, {0, 1})
    assert split_cores(1, [4]) == ({4}, {4})
    with pytest.raises(CoreSplitError, match="leave vLLM none of the 2 cores"):
        split_cores(2, [0, 1])
    with pytest.raises(CoreSplitError, match="negative"):
        split_cores(-1, [0, 1])
