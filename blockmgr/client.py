"""Clients of the block manager: over ZeroMQ (:class:`BlockManagerClient`) or in process.

Both expose the same methods, so an executor runs unchanged against the service or, in tests,
against an in-process :class:`~blockmgr.manager.BlockManager`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import zmq

from blockmgr import protocol, security


class BlockManagerUnavailable(Exception):
    """The block-manager service did not answer in time."""


class BlockManagerRequestError(Exception):
    """The block manager refused a request; the message says why, ``code`` (or None) names the case."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class StaleIncarnation(BlockManagerRequestError):
    """A newer process registered under this executor id; this one must stop (its blocks are gone)."""


class UnknownExecutor(BlockManagerRequestError):
    """The block manager does not know this executor (it restarted without its state): register again."""


_REFUSALS = {"stale_incarnation": StaleIncarnation, "unknown_executor": UnknownExecutor}


class PendingStep:
    """A step sent by ``send_step``; :meth:`reply` waits for the answer and returns it (raising
    what ``step`` raises)."""

    def __init__(self, receive: Callable[[], dict[str, Any]]):
        self._receive = receive

    def reply(self) -> dict[str, Any]:
        return self._receive()


class _Api:
    def _call(self, message: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _checked(self, message: dict[str, Any]) -> dict[str, Any]:
        return self._ok(self._call(message))

    @staticmethod
    def _ok(reply: dict[str, Any]) -> dict[str, Any]:
        if not reply.get("ok"):
            raise _REFUSALS.get(reply.get("code"), BlockManagerRequestError)(reply.get("error", "unknown error"),
                                                                             reply.get("code"))
        return reply

    def ping(self) -> None:
        self._checked({"op": "ping"})

    def register(self, executor_id: str, num_device_blocks: int, block_size: int, num_cpu_blocks: int = 0,
                 cost: dict | None = None, incarnation: str | None = None) -> dict:
        """Register an executor process's pools (see :meth:`blockmgr.manager.BlockManager.register`).

        Raises:
            StaleIncarnation: ``incarnation`` was replaced by a newer process.
        """
        return self._checked(
            {
                "op": "register",
                "executor_id": executor_id,
                "num_device_blocks": num_device_blocks,
                "block_size": block_size,
                "num_cpu_blocks": num_cpu_blocks,
                "cost": cost or {},
                "incarnation": incarnation,
            }
        )

    def step(self, executor_id: str, step_id: int | None = None, incarnation: str | None = None, **lists) -> dict:
        """One batched request per scheduler step.

        Args:
            incarnation: the sending process's incarnation; a replaced one is refused.
            lists: any of ``fork``, ``free``, ``grow``, ``swap_in``, ``admit``; see
                :meth:`blockmgr.manager.BlockManager.step` for their entries and the reply.

        Raises:
            StaleIncarnation: a newer process registered under ``executor_id``.
            UnknownExecutor: the block manager lost this executor's registration.
        """
        return self._checked({"op": "step", "executor_id": executor_id, "step_id": step_id,
                              "incarnation": incarnation, **{k: list(v) for k, v in lists.items()}})

    def send_step(self, executor_id: str, step_id: int | None = None, incarnation: str | None = None,
                  **lists) -> PendingStep:
        """A :meth:`step` whose reply is awaited later (:meth:`PendingStep.reply`). In process the
        step is applied when its reply is asked for; the service applies it meanwhile
        (:class:`BlockManagerClient`)."""
        return PendingStep(lambda: self.step(executor_id, step_id=step_id, incarnation=incarnation, **lists))

    def match_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> dict[str, int]:
        """Cached prefix length (tokens) of ``token_ids`` on each executor."""
        return self._checked({"op": "match_prefix", "token_ids": token_ids, "cache_salt": cache_salt})["matches"]

    def reset_prefix_cache(self, executor_id: str | None = None) -> dict:
        """Drop free cached blocks; ``reset`` in the answer is true only if nothing cached is left."""
        reply = self._checked({"op": "reset_prefix_cache", "executor_id": executor_id})
        reply.pop("ok")
        return reply

    def stats(self, summary: bool = False) -> dict:
        """Per-executor stats; ``summary`` leaves out the fields whose cost grows with the blocks."""
        return self._checked({"op": "stats", "summary": True} if summary else {"op": "stats"})["executors"]

    def cache_lookup(self, token_ids: list[int], cache_salt: str | None = None) -> dict[str, dict]:
        """Per executor: cached tokens of ``token_ids`` by tier (:func:`blockmgr.cache_index.lookup`)."""
        return self._checked({"op": "cache_lookup", "token_ids": token_ids, "cache_salt": cache_salt})["executors"]

    def cache_prefixes(self, executor_id: str | None = None, offset: int = 0, limit: int = 50,
                       max_tokens: int = 32) -> dict:
        """``{"total", "prefixes"}``: cached prefix chains (:func:`blockmgr.cache_index.list_prefixes`)."""
        reply = self._checked({"op": "cache_prefixes", "executor_id": executor_id, "offset": offset,
                               "limit": limit, "max_tokens": max_tokens})
        return {"total": reply["total"], "prefixes": reply["prefixes"]}

    def pin(self, token_ids: list[int] | None = None, cache_salt: str | None = None, prefix_id: str | None = None,
            executor_id: str | None = None, ttl_s: float | None = None) -> list[dict]:
        """Pin a prompt's cached prefix or a prefix chain (:func:`blockmgr.pins.pin`); returns the pins."""
        return self._checked({"op": "pin", "token_ids": token_ids, "cache_salt": cache_salt, "prefix_id": prefix_id,
                              "executor_id": executor_id, "ttl_s": ttl_s})["pins"]

    def unpin(self, pin_id: str) -> dict:
        reply = self._checked({"op": "unpin", "pin_id": pin_id})
        reply.pop("ok")
        return reply

    def pins(self) -> list[dict]:
        return self._checked({"op": "pins"})["pins"]

    def block_map(self) -> dict[str, dict]:
        """Per executor, each block's state as one character (:func:`blockmgr.cache_index.block_map`)."""
        return self._checked({"op": "block_map"})["executors"]

    def sequence(self, executor_id: str, seq_id: str) -> dict:
        return self._checked({"op": "sequence", "executor_id": executor_id, "seq_id": seq_id})["sequence"]


class BlockManagerClient(_Api):
    """Synchronous client over a ZeroMQ DEALER socket; safe to share between threads.

    Args:
        address: the service's address, e.g. ``tcp://127.0.0.1:5557``.
        timeout_s: how long one request waits for its reply.
        keys: this process's CURVE keys (the service is expected to hold the ``blockmgr`` key);
            None talks plain ZeroMQ to an ``--insecure-local`` service.

    Raises (from each call):
        BlockManagerUnavailable: no reply within ``timeout_s``.
        BlockManagerRequestError: the service refused the request.
    """

    def __init__(self, address: str, timeout_s: float = 10.0, keys: security.Keys | None = None):
        self.address = address
        self.keys = keys
        self.timeout_ms = int(timeout_s * 1000)
        self._lock = threading.Lock()
        self._ctx = zmq.Context.instance()
        self._sock = None
        self._in_flight: str | None = None  # the op send_step sent, until its reply is read

    def _connect(self):
        sock = security.limit(self._ctx.socket(zmq.DEALER))
        # A send has the same deadline as the reply: a DEALER whose only peer is gone (or refused
        # the CURVE handshake, so its pipe was torn down) blocks in send, not in the poll below.
        sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        if self.keys is not None:
            self.keys.connect(sock, security.BLOCKMGR)
        sock.connect(self.address)
        return sock

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._send(message)
            return self._receive(message.get("op"))

    def _send(self, message: dict[str, Any]) -> None:
        if self._in_flight is not None:
            raise RuntimeError(f"a {self._in_flight!r} request (send_step) awaits its reply")
        if self._sock is None:
            self._sock = self._connect()
        try:
            self._sock.send_multipart([b"", protocol.encode(message)])
        except zmq.Again:
            self._sock.close()
            self._sock = None
            raise BlockManagerUnavailable(
                f"block manager at {self.address} did not take {message.get('op')!r} "
                f"within {self.timeout_ms / 1000:.1f}s (no connection: is it running, and do the CURVE keys match?)"
            ) from None

    def _receive(self, op: str | None) -> dict[str, Any]:
        if not self._sock.poll(self.timeout_ms):
            # A late reply would be read as the answer to the next request: start afresh.
            self._sock.close()
            self._sock = None
            raise BlockManagerUnavailable(
                f"block manager at {self.address} did not answer {op!r} within {self.timeout_ms / 1000:.1f}s"
            )
        return protocol.decode(self._sock.recv_multipart()[-1])

    def send_step(self, executor_id: str, step_id: int | None = None, incarnation: str | None = None,
                  **lists) -> PendingStep:
        """Send a :meth:`step` and return at once; the returned step's ``reply()`` waits for the
        answer (with the same deadline as any call), so the round trip overlaps what the caller
        does meanwhile. No other request may go out until then (RuntimeError).

        Raises:
            BlockManagerUnavailable: the send itself timed out (no connection); so may ``reply()``.
        """
        with self._lock:
            self._send({"op": "step", "executor_id": executor_id, "step_id": step_id, "incarnation": incarnation,
                        **{k: list(v) for k, v in lists.items()}})
            self._in_flight = "step"
        return PendingStep(self._receive_step)

    def _receive_step(self) -> dict[str, Any]:
        with self._lock:
            if self._in_flight is None:
                raise RuntimeError("this step's reply was abandoned (the client was closed)")
            self._in_flight = None
            reply = self._receive("step")
        return self._ok(reply)

    def close(self) -> None:
        with self._lock:
            self._in_flight = None
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class InProcessBlockManager(_Api):
    """The same API backed by a :class:`BlockManager` in this process (tests, benchmarks)."""

    def __init__(self, manager=None):
        from blockmgr.manager import BlockManager
        from blockmgr.server import handle

        self.manager = manager or BlockManager()
        self._handle = handle

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        from blockmgr import pins

        pins.expire(self.manager)  # as the service does before each request
        # Round-trip through msgpack so in-process tests see exactly what the wire carries.
        return protocol.decode(protocol.encode(self._handle(self.manager, protocol.decode(protocol.encode(message)))))
