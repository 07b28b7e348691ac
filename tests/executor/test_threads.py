"""Default torch threads: the affinity mask's cores, split among executors, logged with the reason."""

import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("env, expected", [({}, "10000000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                           ({"OMP_WAIT_POLICY": "PASSIVE"}, None)])
def test_the_executor_keeps_its_openmp_team_spinning_through_a_step(env, expected):
    """``python -m executor`` sets libgomp's spin count before torch loads (unless the operator set
    the spin count or a wait policy)."""
    child = ("import os, runpy, sys\n"
             "sys.argv = ['executor', '--help']\n"
             "try:\n"
             "    runpy.run_module('executor', run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "print(os.environ.get('GOMP_SPINCOUNT'))\n")
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    proc = subprocess.run([sys.executable, "-c", child], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == str(expected)


@pytest.mark.parametrize("environ, expected", [
    ({}, "not pinned to cores"),
    ({"OMP_PROC_BIND": "false", "OMP_PLACES": "cores"}, "not pinned to cores"),
    ({"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}, "placed by OMP_PROC_BIND=close OMP_PLACES=cores"),
    ({"GOMP_CPU_AFFINITY": "0-1"}, "placed by GOMP_CPU_AFFINITY=0-1"),
])
def test_the_log_says_whether_threads_are_pinned(environ, expected):
    assert threads.thread_placement(environ) == expected
