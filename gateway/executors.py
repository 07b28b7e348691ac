"""The executors the gateway knows: their health, their ``info``, and their load.

A monitor task asks every executor for ``info`` each ``health_interval_s``; an executor that
answered its last probe is *healthy* and can be routed to. An executor whose connection drops
(its process died: the TCP connection closes at once; or it missed ZeroMQ heartbeats for 1.5 s,
see :class:`executor.client.ExecutorClient`) is unhealthy at once and its requests in flight get
an ``unavailable`` output, which :mod:`gateway.generation` answers by resuming them on another
executor.

A hung executor (its step loop stuck in a deadlock or an endless loop) keeps its connection: ZMTP
heartbeats are answered by libzmq's I/O thread, not by the loop. What only a live loop sends is
its progress: outputs after each step and the replies to the ``info`` probes, which it answers
between two steps. An executor with requests in flight that reports no progress for its *stall
limit* is declared dead like a lost one: unhealthy, and its requests get the ``unavailable``
output, so they resume elsewhere (or end with a clear error when no executor is left). The limit
is ``executor_timeout_s`` (10 s by default), stretched to twice the longest step the executor
reported (``longest_step_s`` in its ``info``), so a long step (a long prefill on a slow device)
is not mistaken for a hang.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from executor.client import ExecutorUnavailable

log = logging.getLogger("pagedserve.gateway")


@dataclass
class ExecutorHandle:
    """One executor as the gateway sees it.

    Attributes:
        client: an ``executor.client.ExecutorClient`` (or a stand-in with the same methods).
        info: the last ``info`` reply (executor_id, device, model, num_blocks, block_size,
            max_model_len, num_running, num_waiting, num_swapped, longest_step_s).
        healthy: it answered the last probe.
        waiting: sequences (n per request, or its beams) the gateway sent it whose request has not
            produced its first output yet.
    """

    client: Any
    info: dict = field(default_factory=dict)
    healthy: bool = False
    last_probe_error: str | None = None
    waiting: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def address(self) -> str:
        return self.client.address

    @property
    def executor_id(self) -> str:
        return str(self.info.get("executor_id") or self.client.address)

    @property
    def load(self) -> int:
        return int(self.client.num_active)


class ExecutorPool:
    """Health and info of every executor, kept fresh by a background monitor.

    Args:
        clients: executor clients (not started yet).
        health_interval_s: seconds between two ``info`` probes of each executor.
        executor_timeout_s: seconds without a progress report (an output or a probe reply) after
            which an executor with requests in flight is declared hung (see :meth:`stall_limit_s`).
    """

    def __init__(self, clients: list, health_interval_s: float = 1.0, executor_timeout_s: float = 10.0):
        self.handles = [ExecutorHandle(c) for c in clients]
        for h in self.handles:
            if hasattr(h.client, "on_disconnect"):
                h.client.on_disconnect = functools.partial(self._lost, h)
        self.health_interval_s = health_interval_s
        self.executor_timeout_s = executor_timeout_s
        self._monitor: asyncio.Task | None = None

    async def start(self) -> None:
        for h in self.handles:
            await h.client.start()
        await self.probe_all(timeout_s=min(1.0, self.health_interval_s))
        self._monitor = asyncio.create_task(self._monitor_loop())

    async def close(self) -> None:
        if self._monitor:
            self._monitor.cancel()
            try:
                await self._monitor
            except (asyncio.CancelledError, Exception):
                pass
        for h in self.handles:
            await h.client.close()

    async def probe(self, h: ExecutorHandle, timeout_s: float = 1.0) -> bool:
        """Ask one executor for ``info``; updates its health. Returns whether it answered."""
        try:
            reply = await h.client.request("info", timeout_s=timeout_s)
        except ExecutorUnavailable as exc:
            if h.healthy and self._in_a_long_step(h):
                h.last_probe_error = f"busy: {exc}"
                return False
            if h.healthy:
                log.warning("executor %s (%s) stopped answering: %s", h.executor_id, h.address, exc)
            h.healthy, h.last_probe_error = False, str(exc)
            return False
        reply = {k: v for k, v in reply.items() if k not in ("op", "nonce")}
        if not h.healthy:
            log.info("executor %s at %s is up (%s, %s blocks of %s tokens)", reply.get("executor_id"), h.address,
                     reply.get("device"), reply.get("num_blocks"), reply.get("block_size"))
        h.info, h.healthy, h.last_probe_error = reply, True, None
        return True

    async def probe_all(self, timeout_s: float = 1.0) -> list[ExecutorHandle]:
        await asyncio.gather(*(self.probe(h, timeout_s) for h in self.handles))
        return self.healthy()

    def _lost(self, h: ExecutorHandle) -> None:
        log.error("executor %s at %s is gone (connection lost); routing around it", h.executor_id, h.address)
        h.healthy, h.last_probe_error = False, "connection lost"

    def healthy(self) -> list[ExecutorHandle]:
        return [h for h in self.handles if h.healthy]

    async def available(self) -> list[ExecutorHandle]:
        """Healthy executors; if none is, probe all once more before giving up (startup)."""
        return self.healthy() or await self.probe_all(timeout_s=1.0)

    @property
    def num_waiting(self) -> int:
        return sum(h.waiting for h in self.handles)

    def stall_limit_s(self, h: ExecutorHandle) -> float:
        """Seconds without progress after which ``h`` counts as hung: ``executor_timeout_s``, or
        twice the longest step it reported if that is longer."""
        longest = h.info.get("longest_step_s")
        longest = float(longest) if isinstance(longest, (int, float)) and longest > 0 else 0.0
        return max(self.executor_timeout_s, 2 * longest)

    def _silence_s(self, h: ExecutorHandle) -> float | None:
        """Seconds since ``h`` last reported progress (an output or a probe reply) while it is
        connected and has requests in flight; None otherwise (nothing in flight, or a lost
        connection, whose requests were failed when it dropped)."""
        if h.client.num_active == 0 or not getattr(h.client, "connected", True):
            return None
        return time.monotonic() - (h.client.last_seen or h.started)

    def _in_a_long_step(self, h: ExecutorHandle) -> bool:
        """An unanswered probe that does not make ``h`` unhealthy: the executor answers ``info``
        between steps, so a step longer than the probe's timeout (a long prefill, a loaded CPU)
        delays it. Routing away from it then would turn every long step into refused or resent
        requests; while it is connected, has requests in flight and made progress within its stall
        limit it stays healthy, and :meth:`_check_silence` decides when it is hung."""
        silent = self._silence_s(h)
        return silent is not None and silent <= self.stall_limit_s(h)

    def _check_silence(self, h: ExecutorHandle) -> None:
        silent = self._silence_s(h)
        if silent is None:
            return
        limit = self.stall_limit_s(h)
        if silent > limit:
            h.healthy, h.last_probe_error = False, f"no progress for {silent:.1f}s"
            n = h.client.fail_all(
                f"executor {h.executor_id} at {h.address} has not answered nor made progress for {silent:.1f}s "
                f"(limit {limit:g}s); declared hung")
            if n:
                log.error("executor %s made no progress for %.1fs (hung?): %d in-flight requests resume elsewhere",
                          h.executor_id, silent, n)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.probe_all(timeout_s=max(0.5, self.health_interval_s))
                for h in self.handles:
                    self._check_silence(h)
            except Exception:  # the monitor must outlive any one bad reply
                log.exception("executor monitor failed one round")
