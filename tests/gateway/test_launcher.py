"""`pagedserve serve`'s supervisor: signals stop every child; a dead child is restarted with
backoff; one that keeps dying stops serve, named."""

import signal
import subprocess
import sys
import time

import pytest

from tests import procfs

SUPERVISE = """
import sys
from gateway.launcher import Child, RestartPolicy, supervise
sleeper = ["-c", "import time; time.sleep(120)"]
dier = ["-c", "import time; time.sleep(0.3); raise SystemExit(3)"]
# Dies on its first run only (it leaves a mark file with its pid), then lives.
once = ["-c", "import os, sys, time\\nif not os.path.exists(sys.argv[1]):\\n    open(sys.argv[1], 'w').write(str(os.getpid()))\\n"
        "    raise SystemExit(3)\\ntime.sleep(120)", sys.argv[-1]]
executor = {"die": dier, "once": once}.get(sys.argv[1], sleeper)
kids = [Child("blockmgr", sleeper), Child("executor-0", executor), Child("gateway", sleeper)]
raise SystemExit(supervise(kids, RestartPolicy(initial_backoff_s=0.1, max_backoff_s=0.4, max_restarts=3)))
"""


def _alive_children(pid):
    return [k for k in procfs.children(pid) if procfs.alive(k)]


def _gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procfs.alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_every_child(sig):
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISE, "live"], stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        kids = procfs.children(proc.pid)
        if len(kids) == 3:
            break
        time.sleep(0.05)
    assert len(kids) == 3
    proc.send_signal(sig)
    assert proc.wait(20) == 0
    assert all(_gone(k) for k in kids)


def test_a_child_that_keeps_dying_is_restarted_then_stops_serve_with_its_name():
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISE, "die"], stderr=subprocess.PIPE, text=True)
    time.sleep(0.2)
    kids = procfs.children(proc.pid)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.count("pagedserve: executor-0 exited unexpectedly (exit code 3); restarting it") == 3
    assert "restarting it in 0.1s" in err and "restarting it in 0.2s" in err and "restarting it in 0.4s" in err
    assert "executor-0 exited unexpectedly (exit code 3) 4 times within 60s; giving up" in err
    assert all(_gone(k) for k in kids)


def test_a_dead_child_is_restarted_and_the_others_keep_running(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISE, "once", str(tmp_path / "died")],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            kids = _alive_children(proc.pid)
            mark = (tmp_path / "died").read_text() if (tmp_path / "died").exists() else ""
            if mark and len(kids) == 3 and int(mark) not in kids:
                break
            assert time.monotonic() < deadline and proc.poll() is None, "the dead child was not restarted"
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None and sorted(_alive_children(proc.pid)) == sorted(kids)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert err.count("pagedserve: executor-0 exited unexpectedly (exit code 3); restarting it in 0.1s") == 1
    assert all(_gone(k) for k in kids)


def test_backoff_doubles_up_to_its_cap_and_exit_descriptions():
    from gateway.launcher import RestartPolicy, describe_exit

    policy = RestartPolicy()
    assert [policy.backoff_s(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert describe_exit(3) == "exit code 3" and describe_exit(-signal.SIGKILL) == "signal SIGKILL"
