"""`pagedserve serve`'s supervisor: signals stop every child; a dead child stops serve, named."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUPERVISE = """
import sys
from gateway.launcher import Child, supervise
sleeper = ["-c", "import time; time.sleep(120)"]
dier = ["-c", "import time; time.sleep(1.5); raise SystemExit(3)"]
kids = [Child("blockmgr", sleeper), Child("executor-0", dier if sys.argv[1] == "die" else sleeper),
        Child("gateway", sleeper)]
raise SystemExit(supervise(kids))
"""


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "zombie" in status.read_text():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_every_child(sig):
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISE, "live"], stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        kids = _children(proc.pid)
        if len(kids) == 3:
            break
        time.sleep(0.05)
    assert len(kids) == 3
    proc.send_signal(sig)
    assert proc.wait(20) == 0
    assert all(_gone(k) for k in kids)


def test_dead_child_stops_serve_with_its_name():
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISE, "die"], stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    kids = _children(proc.pid)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "executor-0 exited unexpectedly (exit code 3)" in err
    assert all(_gone(k) for k in kids)
