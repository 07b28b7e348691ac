"""Default torch threads: the affinity mask's cores, split among executors, logged with the reason."""

import os

import pytest

from executor import threads


@pytest.mark.parametrize("cores, executors, expected", [
    (2, 1, (2, "2 usable cores, 1 executor")),
    (8, 2, (4, "8 usable cores, 2 executors")),
    (2, 3, (1, "2 usable cores, 3 executors")),  # never 0
    (7, 2, (3, "7 usable cores, 2 executors")),
])
def test_default_splits_the_affinity_mask(monkeypatch, cores, executors, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's count is not what counts
    assert threads.default_num_threads(executors) == expected


def test_without_sched_getaffinity_counts_the_machine(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert threads.default_num_threads(1) == (6, "6 usable cores, 1 executor")


def test_zero_executors_is_an_error():
    with pytest.raises(ValueError, match="num_executors"):
        threads.default_num_threads(0)
