"""``pagedserve serve``: start the block manager, the executors and the gateway, and watch them.

Each service is its own OS process, started as ``python -m <package>``. Ctrl-C or SIGTERM stops
them all; if one dies, the others are stopped and serve exits with a message naming it.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("pagedserve.serve")


@dataclass
class Child:
    """A service process: ``python <argv>`` with environment ``env`` (None: serve's own)."""

    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    env: dict[str, str] | None = None


def start(child: Child) -> None:
    log.info("starting %s: %s", child.name, " ".join(child.argv))
    child.proc = subprocess.Popen([sys.executable, *child.argv], env=child.env)


def stop_all(children: list[Child], grace_s: float = 10.0) -> None:
    for c in reversed(children):
        if c.proc and c.proc.poll() is None:
            c.proc.terminate()
    deadline = time.monotonic() + grace_s
    for c in reversed(children):
        if c.proc is None:
            continue
        try:
            c.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", c.name, grace_s)
            c.proc.kill()
            c.proc.wait()


def supervise(children: list[Child]) -> int:
    """Start children in order and block until a signal or a child's death. Returns the exit code."""
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for c in children:
        start(c)
    try:
        while stopping["signal"] is None:
            for c in children:
                code = c.proc.poll()
                if code is not None:
                    log.error("%s exited with code %s; stopping the other processes", c.name, code)
                    print(f"pagedserve: {c.name} exited unexpectedly (exit code {code}); shutting down",
                          file=sys.stderr, flush=True)
                    stop_all(children)
                    return 1
            time.sleep(0.2)
        log.info("signal %d received; stopping all processes", stopping["signal"])
        stop_all(children)
        return 0
    except BaseException:
        stop_all(children)
        raise
