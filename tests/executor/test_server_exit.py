"""An executor stopped by SIGTERM (as `pagedserve serve` and compose stop it) exits 0, and its stderr
has no interpreter-exit reports of objects its frozen start-up heap kept alive (nanobind's
"leaked ..." lines for Triton's; see blockmgr/startup_heap.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_stops_the_executor_cleanly(blockmgr_service, smollm_dir, free_port, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    env.update(PAGEDSERVE_INSECURE_LOCAL="true", PAGEDSERVE_NUM_THREADS="1")
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "executor", "--blockmgr", blockmgr_service.address, "--bind",
             f"tcp://127.0.0.1:{free_port()}", "--model", str(smollm_dir), "--device", "cpu", "--num-blocks", "16"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while "serving on" not in stderr_path.read_text():
            assert proc.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = stderr_path.read_text()
    assert code == 0, err
    assert "stopping on signal 15" in err
    assert not [line for line in err.splitlines() if "leaked" in line], err
