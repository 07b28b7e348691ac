"""The gateway's asyncio client of one executor process (ZeroMQ DEALER).

One socket carries every request to the executor; a reader task routes the executor's output
messages to per-request queues and its replies to the futures of ``info`` / ``ping`` /
``sequences`` calls (matched by nonce). See ``executor/protocol.py`` for the messages.

Anything with the same methods (``start``, ``close``, ``request``, ``generate``, ``abort``,
``num_active``, ``last_seen``) can stand in for it, e.g. ``FakeExecutor`` in tests/gateway/fakes.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from blockmgr import security
from executor import protocol

log = logging.getLogger("pagedserve.gateway")


class ExecutorUnavailable(Exception):
    """The executor did not answer in time."""


def split_address(address: str) -> tuple[str | None, str]:
    """``"executor-0@tcp://h:5560"`` -> ``("executor-0", "tcp://h:5560")``; no ``@``: ``(None, address)``."""
    name, sep, rest = address.partition("@")
    if sep and "://" not in name:
        return name, rest
    return None, address


def expected_outputs(params: dict[str, Any]) -> int:
    """How many output indexes (children) a generate message with these params yields."""
    n = params.get("n", 1)
    return n if isinstance(n, int) and n > 1 else 1


SEND_HWM = 10_000  # messages queued to the executor before a send fails (reported, never dropped)
RECV_HWM = 100_000  # messages (a step's outputs each) queued from the executor; beyond it its send fails and it aborts
HEARTBEAT_IVL_MS = 500  # ZMTP heartbeats: a dead or unreachable executor is noticed within
HEARTBEAT_TIMEOUT_MS = 1500  # about 1.5 s even when no TCP reset arrives


class ExecutorClient:
    """Submits requests to one executor and routes its outputs to per-request queues.

    Must be created and used inside one running event loop; call :meth:`start` first.

    A socket monitor watches the connection: when it drops (the executor process died, or
    missed its heartbeats for ``HEARTBEAT_TIMEOUT_MS``), every request in flight at once gets an
    output with ``finish_reason == "error"`` and ``unavailable: True`` (which the gateway answers
    by resuming the request elsewhere), and ``on_disconnect`` is called. While a connection that
    was up is down, and when the send queue is at its high-water mark, a message is not queued
    for later: sending it raises :class:`ExecutorUnavailable`. Outputs of a request this client no
    longer follows (one it gave up on) abort that request, so no executor computes for no one.

    Args:
        address: the executor's ZeroMQ address; with keys, prefixed by its executor id (its
            principal, whose public key the client expects), e.g. ``executor-0@tcp://host:5560``.
        keys: this process's CURVE keys; None talks plain ZeroMQ to an ``--insecure-local`` executor.

    Raises:
        ValueError: keys but no executor id in ``address``.

    Attributes:
        address: the executor's ZeroMQ address.
        server_name: the executor id given in the address (None if none).
        num_active: requests submitted and not yet finished (the gateway's view of its load).
        last_seen: ``time.monotonic()`` of the last message from the executor (None: never).
        connected: the connection is up (handshake done, not dropped since).
        on_disconnect: called with no arguments when the connection drops.
    """

    def __init__(self, address: str, keys: security.Keys | None = None):
        self.server_name, self.address = split_address(address)
        if keys is not None and self.server_name is None:
            raise ValueError(f"executor address {address!r}: name the executor whose key to expect, "
                             f"as EXECUTOR_ID@{address}")
        self.keys = keys
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._nonce = itertools.count()
        self._reader: asyncio.Task | None = None
        self.num_active = 0
        self.last_seen: float | None = None
        self.connected = False
        self._ever_connected = False
        self.on_disconnect = None
        self._monitor: asyncio.Task | None = None

    async def start(self) -> None:
        self._sock = security.limit(self._ctx.socket(zmq.DEALER))
        self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._sock.setsockopt(zmq.RCVHWM, RECV_HWM)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if self.keys is not None:
            self.keys.connect(self._sock, self.server_name)
        monitor = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._sock.connect(self.address)
        self._reader = asyncio.create_task(self._read_loop())
        self._monitor = asyncio.create_task(self._monitor_loop(monitor))

    async def close(self) -> None:
        for task in (self._reader, self._monitor):
            if task:
                task.cancel()
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close()
            self._sock = None

    async def _monitor_loop(self, monitor) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.connected = self._ever_connected = True
                elif event == zmq.EVENT_DISCONNECTED and self.connected:
                    self.connected = False
                    n = self.fail_all(f"lost the connection to the executor at {self.address}")
                    log.error("executor at %s disconnected; %d requests in flight", self.address, n)
                    if self.on_disconnect is not None:
                        self.on_disconnect()
        finally:
            monitor.close(linger=0)

    async def _read_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            self.last_seen = time.monotonic()
            try:
                msg = protocol.decode(frames[-1])
            except ValueError as exc:
                log.warning("executor %s sent a malformed frame: %s", self.address, exc)
                continue
            op = msg.get("op")
            if op == "output":
                self._route_output(msg)
            elif op == "outputs":
                outputs = msg.get("outputs")
                if not isinstance(outputs, list):
                    log.warning("executor %s sent an outputs message without a list of outputs", self.address)
                    continue
                for out in outputs:
                    if isinstance(out, dict):
                        out["op"] = "output"
                        self._route_output(out)
            elif op == "reply":
                fut = self._replies.pop(msg.get("nonce"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif op == "error":
                log.warning("executor %s refused a message: %s", self.address, msg.get("error"))
                fut = self._replies.pop(msg.get("nonce"), None) if "nonce" in msg else None
                if fut is not None and not fut.done():
                    fut.set_exception(ExecutorUnavailable(f"executor at {self.address} refused: {msg.get('error')}"))

    def _route_output(self, msg: dict[str, Any]) -> None:
        rid = msg.get("request_id")
        if not isinstance(rid, str):  # a map or list would not even hash
            log.warning("executor %s sent an output without a request id", self.address)
            return
        queue = self._queues.get(rid)
        if queue is not None:
            queue.put_nowait(msg)
        elif not msg.get("finished"):  # a request we no longer wait for: stop it there
            self.abort(rid)

    def _send_nowait(self, message: dict[str, Any]) -> None:
        """Queue a message on the socket without awaiting (safe inside a cancelled task)."""
        if self._sock is None:
            raise ExecutorUnavailable(f"executor client for {self.address} is closed")
        if self._ever_connected and not self.connected:
            # Queued, it would reach a restarted executor long after we gave up on it.
            raise ExecutorUnavailable(f"cannot deliver {message.get('op')!r}: the executor at {self.address} "
                                      f"is disconnected")
        sent = self._sock.send_multipart([protocol.encode(message)], flags=zmq.NOBLOCK)
        if sent.done() and sent.exception() is not None:  # no live connection, or the queue is full
            raise ExecutorUnavailable(f"cannot deliver {message.get('op')!r} to the executor at {self.address}: "
                                      f"{sent.exception()}")

    async def request(self, op: str, timeout_s: float = 2.0, **fields: Any) -> dict[str, Any]:
        """Send a nonce-answered op (``info``, ``ping``, ``sequences``) and await its reply.

        Raises:
            ExecutorUnavailable: no reply within ``timeout_s``.
        """
        nonce = next(self._nonce)
        fut = asyncio.get_running_loop().create_future()
        self._replies[nonce] = fut
        self._send_nowait({**fields, "op": op, "nonce": nonce})
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            self._replies.pop(nonce, None)
            raise ExecutorUnavailable(f"executor at {self.address} did not answer {op!r} within {timeout_s}s") from None

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Abort a request and all its children, or only its completion ``index`` (fire and forget;
        frees the blocks at the executor's next step)."""
        message = {"op": "abort", "request_id": request_id}
        if index is not None:
            message["index"] = index
        try:
            self._send_nowait(message)
        except Exception as exc:  # the socket is closing: the executor frees nothing we can reach
            log.warning("could not send abort of %s to %s: %s", request_id, self.address, exc)

    def fail_all(self, reason: str) -> int:
        """End every in-flight request with an ``unavailable`` error output; returns how many."""
        for rid, queue in list(self._queues.items()):
            queue.put_nowait({"op": "output", "request_id": rid, "index": 0, "token_ids": [], "finished": True,
                              "finish_reason": "error", "error": reason, "unavailable": True})
        return len(self._queues)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any],
                       priority: int = 0, cache_salt: str | None = None,
                       output_token_ids: list[int] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield output messages for one request until every child (index) has finished.

        An output with ``finish_reason == "error"`` ends the whole request. If the caller stops
        early (client disconnect, stop string, cancellation) the request is aborted.

        Args:
            output_token_ids: tokens the request already produced on an executor that died; it
                resumes after them (``n == 1`` only; see ``executor/protocol.py``).

        Raises:
            ExecutorUnavailable: the request could not be delivered (no live connection).
        """
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in flight")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self.num_active += 1
        pending = set(range(expected_outputs(params)))
        try:
            message = {"op": "generate", "request_id": request_id, "prompt_token_ids": prompt_token_ids,
                       "params": params, "priority": priority, "cache_salt": cache_salt}
            if output_token_ids:
                message["output_token_ids"] = list(output_token_ids)
            self._send_nowait(message)
            while pending:
                msg = await queue.get()
                if msg.get("finish_reason") == "error":
                    pending.clear()
                elif msg.get("finished"):
                    pending.discard(msg.get("index", 0) or 0)
                yield msg
        finally:
            self.num_active -= 1
            self._queues.pop(request_id, None)
            if pending:
                self.abort(request_id)
