"""The gateway's asyncio client of one executor process (ZeroMQ DEALER)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq
import zmq.asyncio

from executor import protocol

log = logging.getLogger("pagedserve.gateway")


class ExecutorUnavailable(Exception):
    """The executor did not answer in time."""


class ExecutorClient:
    """Submits requests to one executor and routes its outputs to per-request queues.

    Must be created and used inside one running event loop; call :meth:`start` first.
    """

    def __init__(self, address: str):
        self.address = address
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._nonce = itertools.count()
        self._reader: asyncio.Task | None = None
        self.num_active = 0

    async def start(self) -> None:
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)
        self._reader = asyncio.create_task(self._read_loop())

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close()

    async def _read_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
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

    async def _send(self, message: dict[str, Any]) -> None:
        await self._sock.send_multipart([protocol.encode(message)])

    async def request(self, op: str, timeout_s: float = 2.0) -> dict[str, Any]:
        """Send ``info`` or ``ping`` and await the reply.

        Raises:
            ExecutorUnavailable: no reply within ``timeout_s``.
        """
        nonce = next(self._nonce)
        fut = asyncio.get_running_loop().create_future()
        self._replies[nonce] = fut
        await self._send({"op": op, "nonce": nonce})
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            self._replies.pop(nonce, None)
            raise ExecutorUnavailable(f"executor at {self.address} did not answer {op!r} within {timeout_s}s") from None

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any]):
        """Yield output messages for one request until it finishes; aborts it if the caller stops early."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self.num_active += 1
        finished = False
        try:
            await self._send({"op": "generate", "request_id": request_id,
                              "prompt_token_ids": prompt_token_ids, "params": params})
            while not finished:
                msg = await queue.get()
                finished = msg["finished"]
                yield msg
        finally:
            self.num_active -= 1
            self._queues.pop(request_id, None)
            if not finished:
                # Client went away (disconnect, stop string): free the request's blocks.
                await self._send({"op": "abort", "request_id": request_id})
