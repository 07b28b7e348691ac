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


class ExecutorClient:
    """Submits requests to one executor and routes its outputs to per-request queues.

    Must be created and used inside one running event loop; call :meth:`start` first.

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

    async def start(self) -> None:
        self._sock = security.limit(self._ctx.socket(zmq.DEALER))
        if self.keys is not None:
            self.keys.connect(self._sock, self.server_name)
        self._sock.connect(self.address)
        self._reader = asyncio.create_task(self._read_loop())

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _read_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            self.last_seen = time.monotonic()
            try:
                msg = protocol.decode(frames[-1])
            except ValueError as exc:
                log.warning("executor %s sent a malformed frame: %s", self.address, exc)
                continue
            if msg.get("op") == "output":
                queue = self._queues.get(msg.get("request_id"))
                if queue is not None:
                    queue.put_nowait(msg)
            elif msg.get("op") == "reply":
                fut = self._replies.pop(msg.get("nonce"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif msg.get("op") == "error":
                log.warning("executor %s refused a message: %s", self.address, msg.get("error"))
                fut = self._replies.pop(msg.get("nonce"), None) if "nonce" in msg else None
                if fut is not None and not fut.done():
                    fut.set_exception(ExecutorUnavailable(f"executor at {self.address} refused: {msg.get('error')}"))

    def _send_nowait(self, message: dict[str, Any]) -> None:
        """Queue a message on the socket without awaiting (safe inside a cancelled task)."""
        if self._sock is None:
            raise ExecutorUnavailable(f"executor client for {self.address} is closed")
        # zmq.asyncio sends at once when the socket can take the message; the returned future
        # only matters when the send buffer is full.
        self._sock.send_multipart([protocol.encode(message)])

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
                       priority: int = 0, cache_salt: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield output messages for one request until every child (index) has finished.

        An output with ``finish_reason == "error"`` ends the whole request. If the caller stops
        early (client disconnect, stop string, cancellation) the request is aborted.
        """
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in flight")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self.num_active += 1
        pending = set(range(expected_outputs(params)))
        try:
            self._send_nowait({"op": "generate", "request_id": request_id, "prompt_token_ids": prompt_token_ids,
                               "params": params, "priority": priority, "cache_salt": cache_salt})
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
