"""``pagedserve serve``: start the block manager, the executors and the gateway, and keep them up.

Each service is its own OS process, started as ``python -m <package>``. Ctrl-C or SIGTERM stops
them all. A child that dies is restarted on its own, after a backoff, while the others go on: a
restarted executor is a new incarnation (the block manager drops the old one's state and the
gateway resumes its requests elsewhere or on it once it is back); a restarted block manager
recovers from Redis with ``--redis-url``, else starts empty and the executors register again; a
restarted gateway binds its port again. A child that keeps dying (more than
``RestartPolicy.max_restarts`` deaths within ``window_s``) makes serve give up: it stops the
others and exits with a message naming the child.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("pagedserve.serve")


@dataclass
class RestartPolicy:
    """When to restart a dead child, and when to give up.

    Attributes:
        initial_backoff_s: wait before the first restart; doubled for each further death within
            ``window_s``, up to ``max_backoff_s``.
        max_restarts: deaths within ``window_s`` that are still restarted; one more stops serve.
        window_s: seconds a death is remembered (older ones neither lengthen the backoff nor count).
    """

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_restarts: int = 5
    window_s: float = 60.0

    def backoff_s(self, recent_deaths: int) -> float:
        """Seconds to wait before restarting a child that died ``recent_deaths`` (>= 1) times lately."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** (recent_deaths - 1))


@dataclass
class Child:
    """A service process: ``python <argv>`` with environment ``env`` (None: serve's own).

    ``proc`` is None while it waits to be restarted (until ``restart_at``)."""

    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    env: dict[str, str] | None = None
    deaths: deque = field(default_factory=deque)  # time.monotonic() of recent deaths
    restart_at: float | None = None


def start(child: Child) -> None:
    """Spawn ``child`` (the one place a child process is created)."""
    log.info("starting %s: %s", child.name, " ".join(child.argv))
    child.proc = subprocess.Popen([sys.executable, *child.argv], env=child.env)
    child.restart_at = None


def describe_exit(code: int) -> str:
    """``"exit code 3"`` or, for a process killed by a signal (negative code), ``"signal SIGKILL"``."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


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


def _on_death(c: Child, code: int, policy: RestartPolicy, now: float) -> bool:
    """Record a death and schedule the restart; False when ``c`` died too often (give up)."""
    c.deaths.append(now)
    while c.deaths and now - c.deaths[0] > policy.window_s:
        c.deaths.popleft()
    how = describe_exit(code)
    if len(c.deaths) > policy.max_restarts:
        log.error("%s exited (%s), its %d. death within %.0fs; giving up", c.name, how, len(c.deaths),
                  policy.window_s)
        print(f"pagedserve: {c.name} exited unexpectedly ({how}) {len(c.deaths)} times within "
              f"{policy.window_s:.0f}s; giving up and shutting down", file=sys.stderr, flush=True)
        return False
    wait = policy.backoff_s(len(c.deaths))
    log.error("%s exited unexpectedly (%s); restarting it in %.1fs (restart %d of at most %d within %.0fs)",
              c.name, how, wait, len(c.deaths), policy.max_restarts, policy.window_s)
    print(f"pagedserve: {c.name} exited unexpectedly ({how}); restarting it in {wait:.1f}s",
          file=sys.stderr, flush=True)
    c.proc, c.restart_at = None, now + wait
    return True


def supervise(children: list[Child], policy: RestartPolicy | None = None) -> int:
    """Start children in order and keep them running until a signal, restarting any that dies.

    Returns:
        0 after a signal stopped them all; 1 when a child died more often than ``policy`` allows
        (the others are stopped first).
    """
    policy = policy or RestartPolicy()
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for c in children:
        start(c)
    try:
        while stopping["signal"] is None:
            now = time.monotonic()
            for c in children:
                if c.proc is None:
                    if now >= c.restart_at:
                        start(c)
                    continue
                code = c.proc.poll()
                if code is not None and not _on_death(c, code, policy, now):
                    stop_all(children)
                    return 1
            time.sleep(0.2)
        log.info("signal %d received; stopping all processes", stopping["signal"])
        stop_all(children)
        return 0
    except BaseException:
        stop_all(children)
        raise
