"""The executors the gateway knows: their health, their ``info``, and their load.

A monitor task asks every executor for ``info`` each ``health_interval_s``; an executor that
answered its last probe is *healthy* and can be routed to. An executor whose connection drops
(its process died: the TCP connection closes at once; or it missed ZeroMQ heartbeats for 1.5 s,
see :class:`executor.client.ExecutorClient`) is unhealthy at once and its requests in flight get
an ``unavailable`` output, which :mod:`gateway.generation` answers by resuming them on another
executor. One that stays connected but silent for ``executor_timeout_s`` while it has requests in
flight (a hung process) is declared dead too: those requests end with an ``unavailable`` error.
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
            max_model_len, num_running, num_waiting, num_swapped).
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
        executor_timeout_s: silence after which in-flight requests of an executor fail.
    """

    def __init__(self, clients: list, health_interval_s: float = 1.0, executor_timeout_s: float = 60.0):
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

    def _check_silence(self, h: ExecutorHandle) -> None:
        if h.client.num_active == 0:
            return
        last = h.client.last_seen or h.started
        silent = time.monotonic() - last
        if silent > self.executor_timeout_s:
            n = h.client.fail_all(
                f"executor {h.executor_id} at {h.address} has not answered for {silent:.0f}s; "
                f"its requests were abandoned")
            if n:
                log.error("executor %s silent for %.0fs: failed %d in-flight requests", h.executor_id, silent, n)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.probe_all(timeout_s=max(0.5, self.health_interval_s))
                for h in self.handles:
                    self._check_silence(h)
            except Exception:  # the monitor must outlive any one bad reply
                log.exception("executor monitor failed one round")
