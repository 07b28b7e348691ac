"""A stand-in for the executor, so the gateway runs in process without a model.

``FakeExecutor`` has the methods of ``executor.client.ExecutorClient`` and speaks the same
output messages (index, token_ids, finished, finish_reason, error, num_prompt_tokens,
num_cached_tokens, logprobs, prompt_logprobs). It "generates" a scripted continuation one token
per step. Its KV blocks come from the real block manager, in process: it admits each prompt,
forks the n > 1 children, grows every sequence by one token per step and frees it at the end,
so block accounting, the prefix cache (and routing on it) and cache inspection are the real ones.

Used by the gateway's fast tests and the online benchmark's test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable

from blockmgr.client import BlockManagerRequestError, BlockManagerUnavailable, InProcessBlockManager
from blockmgr.manager import DENIED_NEVER_FITS, BlockManager
from executor.client import ExecutorUnavailable, expected_outputs
from executor.request import SamplingParams

SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))

DEFAULT_REPLY = "Hello there! This is a fake reply, with 你好 and 🙂 in it."


class BlockManagerConnection(InProcessBlockManager):
    """A client's connection to a real :class:`~blockmgr.manager.BlockManager` in this process.

    The gateway and every FakeExecutor get their own connection to one shared manager, as they
    would to one block-manager service; a shared lock serializes them (the gateway calls from
    worker threads, the fake executors from the event loop).

    Attributes:
        down: when True every call on *this* connection raises ``BlockManagerUnavailable`` (an
            outage seen by one client only, e.g. the gateway, while the executors keep running).
        calls: the ops sent on this connection, in order (e.g. to assert a request never reached
            the block manager).
    """

    def __init__(self, manager: BlockManager | None = None, lock: threading.Lock | None = None):
        super().__init__(manager if manager is not None else BlockManager())
        self._lock = lock or threading.Lock()
        self.down = False
        self.calls: list[str] = []

    def connect(self) -> "BlockManagerConnection":
        """Another connection to the same manager."""
        return BlockManagerConnection(self.manager, self._lock)

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(message.get("op"))
        if self.down:
            raise BlockManagerUnavailable(f"block manager connection is down ({message.get('op')!r})")
        with self._lock:
            return super()._call(message)


def _fake_logprob(token_id: int, pos: int) -> float:
    return -0.05 - 0.1 * ((token_id + pos) % 7)


class FakeExecutor:
    """An in-process executor with ``ExecutorClient``'s methods.

    Args:
        executor_id: its id (as in ``info``).
        blockmgr: its :class:`BlockManagerConnection` (None: no block accounting). A sequence the
            block manager preempts fails with an error output: the fake neither swaps nor recomputes.
        tokenizer: used to turn ``reply`` into tokens (and for the vocabulary size).
        reply: the continuation, as text, or a function ``(prompt_ids, params, index) -> token ids``.
        eos_token_id: sent with finish reason ``stop`` when the reply is exhausted.
        token_delay_s: pause between two generated tokens.
        first_token_delay_s: pause before the first output (a queued or prefilling request).
        info_delay_s: while a request is in flight, ``info`` is answered only after this long (the
            real executor answers between steps, so a long step delays it); beyond the caller's
            timeout it is not answered.
        fail_after_tokens: fail every request with an error output after this many steps.
        known_params: SamplingParams fields it accepts; others are refused like the real executor does.

    Attributes:
        received: every generate message (dicts), for assertions.
        aborted: request ids aborted (by the client or by stopping early).
        aborted_choices: ``(request id, index)`` of single completions aborted.
        down: when True it answers nothing (requests time out, generate never outputs).
        hung: set by :meth:`hang`: connected, but its step loop is stuck.
        on_disconnect: called by :meth:`crash`, as ``ExecutorClient`` calls it on a lost connection.
    """

    def __init__(self, executor_id: str = "executor-0", blockmgr: BlockManagerConnection | None = None, tokenizer=None,
                 reply: str | Callable = DEFAULT_REPLY, eos_token_id: int = 2, num_blocks: int = 256,
                 block_size: int = 16, max_model_len: int = 2048, token_delay_s: float = 0.0,
                 first_token_delay_s: float = 0.0, fail_after_tokens: int | None = None, known_params: frozenset = SAMPLING_FIELDS, vocab_size: int | None = None,
                 info_delay_s: float = 0.0):
        self.executor_id = executor_id
        self.address = f"fake://{executor_id}"
        self.blockmgr = blockmgr
        self.tokenizer = tokenizer
        self.reply = reply
        self.eos_token_id = eos_token_id
        self.num_blocks, self.block_size, self.max_model_len = num_blocks, block_size, max_model_len
        self.token_delay_s = token_delay_s
        self.first_token_delay_s = first_token_delay_s
        self.info_delay_s = info_delay_s
        self.fail_after_tokens = fail_after_tokens
        self.known_params = known_params
        self.vocab_size = vocab_size or (len(tokenizer) if tokenizer is not None else 49152)
        self.received: list[dict] = []
        self.aborted: list[str] = []
        self.aborted_choices: list[tuple[str, int]] = []  # (request id, index) of single completions
        self.down = False
        self.num_active = 0
        self.last_seen: float | None = None
        self._abort_flags: set[str] = set()
        self._running: dict[str, dict] = {}
        self._reply_ids: list[int] | None = None
        self._crashed = False
        self._incarnation = 0
        self.on_disconnect = None
        self.hung = False
        self._client_ids: set[str] = set()  # the gateway-side streams open, kept across crash/restart
        self._failed: dict[str, str] = {}  # request id -> why the client gave up on it (fail_all)

    def crash(self) -> None:
        """Die as a process does: requests in flight get the client's ``unavailable`` output at once,
        nothing answers until :meth:`restart`."""
        self.down = self._crashed = True
        if self.on_disconnect is not None:
            self.on_disconnect()

    def hang(self) -> None:
        """Get stuck as a deadlocked step loop does: the connection stays up (no ``on_disconnect``),
        but no probe is answered and no request makes progress until the client gives up on it
        (:meth:`fail_all`)."""
        self.hung = True

    def restart(self) -> None:
        """Come back as a new process: a new incarnation, whose registration drops the old one's
        sequences and blocks in the block manager."""
        self.down = self._crashed = self.hung = False
        self._running.clear()
        self._incarnation += 1
        self._register()

    # -- lifecycle ------------------------------------------------------------------------------
    def _register(self) -> None:
        if self.blockmgr is not None:
            self.blockmgr.register(self.executor_id, self.num_blocks, self.block_size,
                                   incarnation=f"fake-{self._incarnation}")

    async def start(self) -> None:
        self._register()

    async def close(self) -> None:
        pass

    @property
    def connected(self) -> bool:
        """Like ``ExecutorClient.connected``: the connection is up (a hung executor's is)."""
        return not self._crashed

    async def request(self, op: str, timeout_s: float = 2.0, **fields: Any) -> dict[str, Any]:
        in_a_long_step = op == "info" and self.info_delay_s and self._running
        if self.down or self.hung or op not in ("info", "ping", "sequences") or (
                in_a_long_step and self.info_delay_s >= timeout_s):
            await asyncio.sleep(timeout_s)
            raise ExecutorUnavailable(f"executor at {self.address} did not answer {op!r} within {timeout_s}s")
        if in_a_long_step:
            await asyncio.sleep(self.info_delay_s)
        self.last_seen = time.monotonic()
        reply: dict[str, Any] = {"op": "reply", "nonce": 0}
        if op == "info":
            reply.update(executor_id=self.executor_id, device="cpu", model="fake", num_blocks=self.num_blocks,
                         block_size=self.block_size, max_model_len=self.max_model_len, async_scheduling=True,
                         num_running=len(self._running), num_waiting=0, num_swapped=0)
        elif op == "sequences":
            reply["sequences"] = [
                {"request_id": rid, "seq_id": seq_id, "state": "running", "num_prompt_tokens": r["num_prompt"],
                 "num_output_tokens": r["out"].get(seq_id, 0),
                 "num_blocks": -(-(r["num_prompt"] + r["out"].get(seq_id, 0)) // self.block_size)}
                for rid, r in self._running.items() for seq_id in r["seqs"]]
        return reply

    def abort(self, request_id: str, index: int | None = None) -> None:
        if index is None:
            self._abort_flags.add(request_id)
        else:
            self.aborted_choices.append((request_id, index))

    def fail_all(self, reason: str) -> int:
        """As the client's: every request in flight ends with an ``unavailable`` error output."""
        for rid in self._running:
            self._failed[rid] = reason
        return len(self._running)

    # -- generation -----------------------------------------------------------------------------
    def _continuation(self, prompt_ids: list[int], params: dict, index: int) -> list[int]:
        if callable(self.reply):
            return list(self.reply(prompt_ids, params, index))
        if self._reply_ids is None:
            self._reply_ids = self.tokenizer.encode(self.reply, add_special_tokens=False) if self.tokenizer else \
                list(range(100, 100 + len(self.reply)))
        return list(self._reply_ids)

    def _error(self, request_id: str, message: str) -> dict:
        return {"op": "output", "request_id": request_id, "index": 0, "token_ids": [], "finished": True,
                "finish_reason": "error", "error": message, "num_prompt_tokens": 0, "num_cached_tokens": 0,
                "logprobs": None, "prompt_logprobs": None}

    def _validate(self, prompt_ids: list[int], params: dict) -> str | None:
        unknown = set(params) - self.known_params
        if unknown:
            return f"unknown sampling parameters: {sorted(unknown)}"
        if not prompt_ids:
            return "the prompt is empty"
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            return f"prompt token ids must be in [0, {self.vocab_size})"
        total = len(prompt_ids) + int(params.get("max_tokens", 16))
        if total > self.max_model_len:
            return f"prompt + max_tokens = {total} exceeds the model's context length {self.max_model_len}"
        return None

    async def _admit(self, request_id: str, seqs: list[str], prompt: list[int], cache_salt: str | None,
                     priority: int) -> int | str:
        """Admit the whole prompt as ``seqs[0]`` and fork the other sequences from it.

        Waits while the pool is full, as the real scheduler keeps a request waiting.

        Returns:
            the prompt tokens found in the prefix cache, or an error message (never fits, aborted).
        """
        while True:
            reply = self.blockmgr.step(self.executor_id,
                                       admit=[[seqs[0], prompt, len(prompt), cache_salt, priority]])
            denied = reply["denied"].get(seqs[0])
            if denied is None:
                break
            if denied == DENIED_NEVER_FITS:
                return f"the prompt needs more KV blocks than the pool's {self.num_blocks}"
            if request_id in self._abort_flags:
                return "aborted while waiting for KV blocks"
            await asyncio.sleep(0.01)
        if len(seqs) > 1:
            self.blockmgr.step(self.executor_id, fork=[[seqs[0], child] for child in seqs[1:]])
        return reply["admitted"][seqs[0]]

    def _grow(self, seq_id: str, num_tokens: int, token: int) -> str | None:
        """Room for one more token; an error message when the sequence was preempted."""
        try:
            reply = self.blockmgr.step(self.executor_id, grow=[[seq_id, num_tokens, [token]]])
        except BlockManagerRequestError as e:  # preempted earlier, as another sequence's victim
            return f"the fake executor does not resume preempted sequences ({e})"
        if seq_id in reply["preempted"] or seq_id in reply["denied"]:
            return f"the fake executor does not resume preempted sequences ({seq_id} was preempted)"
        return None

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any],
                       priority: int = 0, cache_salt: str | None = None, output_token_ids: list[int] | None = None):
        if request_id in self._client_ids:  # ExecutorClient.generate's contract: one stream per id
            raise ValueError(f"request id {request_id!r} is already in flight")
        self._client_ids.add(request_id)
        inner = self._generate(request_id, prompt_token_ids, params, priority, cache_salt, output_token_ids)
        try:
            async for msg in inner:
                yield msg
        finally:
            await inner.aclose()  # now, as closing the client's stream aborts at once
            self._client_ids.discard(request_id)

    async def _generate(self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any],
                        priority: int, cache_salt: str | None, output_token_ids: list[int] | None):
        self.received.append({"request_id": request_id, "prompt_token_ids": list(prompt_token_ids),
                               "params": dict(params), "priority": priority, "cache_salt": cache_salt,
                               "output_token_ids": list(output_token_ids or [])})
        if self.down:
            await asyncio.Event().wait()  # never answers
        err = self._validate(prompt_token_ids, params)
        if err:
            yield self._error(request_id, err)
            return
        incarnation = self._incarnation
        n = expected_outputs(params)
        max_tokens = int(params.get("max_tokens", 16))
        k = params.get("logprobs")
        pk = params.get("prompt_logprobs")
        ignore_eos = bool(params.get("ignore_eos"))
        stop_ids = set(params.get("stop_token_ids") or [])
        beam = bool(params.get("use_beam_search"))  # like the real one: the best beam only at the end
        held: list[int] = []
        seqs = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
        conts = [self._continuation(prompt_token_ids, params, i) for i in range(n)]
        run = {"num_prompt": len(prompt_token_ids), "seqs": seqs, "out": {}}
        self._running[request_id] = run
        self.num_active += 1
        finished = [False] * n
        first = True
        try:
            cached = 0
            if self.blockmgr is not None:
                # A resumed request recomputes its prompt and the tokens it already produced.
                resumed = list(prompt_token_ids) + list(output_token_ids or [])
                cached = await self._admit(request_id, seqs, resumed, cache_salt, priority)
                if isinstance(cached, str):
                    yield self._error(request_id, cached)
                    return
            if self.first_token_delay_s:
                await asyncio.sleep(self.first_token_delay_s)
            for step in range(len(output_token_ids or []), max_tokens):
                while self.hung and request_id not in self._failed:
                    await asyncio.sleep(0.01)
                if request_id in self._failed:
                    yield {**self._error(request_id, self._failed.pop(request_id)), "unavailable": True}
                    return
                if self._crashed or incarnation != self._incarnation:  # died (and maybe came back since)
                    yield {**self._error(request_id, f"lost the connection to the executor at {self.address}"),
                           "unavailable": True}
                    return
                if self.fail_after_tokens is not None and step >= self.fail_after_tokens:
                    yield self._error(request_id, "the executor failed the request (scripted)")
                    return
                for i in range(n):
                    if finished[i]:
                        continue
                    if request_id in self._abort_flags:
                        return
                    if (request_id, i) in self.aborted_choices:
                        finished[i] = True
                        if self.blockmgr is not None:
                            self.blockmgr.step(self.executor_id, free=[seqs[i]])
                        continue
                    cont = conts[i]
                    token = cont[step] if step < len(cont) else self.eos_token_id
                    reason = None
                    if (token == self.eos_token_id and not ignore_eos) or token in stop_ids:
                        reason = "stop"
                    elif step + 1 >= max_tokens:
                        reason = "length"
                    run["out"][seqs[i]] = step + 1
                    if self.blockmgr is not None:
                        refused = self._grow(seqs[i], len(prompt_token_ids) + step + 1, token)
                        if refused:
                            yield self._error(request_id, refused)
                            return
                    msg = {"op": "output", "request_id": request_id, "index": i, "token_ids": [token],
                           "finished": reason is not None, "finish_reason": reason, "error": None,
                           "num_prompt_tokens": len(prompt_token_ids), "num_cached_tokens": cached,
                           "logprobs": None, "prompt_logprobs": None}
                    if k is not None:
                        lp = _fake_logprob(token, step)
                        top = [[token, lp]] + [[(token + j) % self.vocab_size, lp - j] for j in range(1, k)]
                        msg["logprobs"] = [{"token_id": token, "logprob": lp, "top": top[:k]}]
                    if first and pk is not None:
                        msg["prompt_logprobs"] = [None] + [
                            {"token_id": t, "logprob": _fake_logprob(t, p),
                             "top": [[t, _fake_logprob(t, p)]][:pk]} for p, t in enumerate(prompt_token_ids[1:], 1)]
                    if beam and reason is None:
                        held.append(token)
                        continue
                    if beam:
                        msg["token_ids"] = held + [token]
                    first = False
                    if reason is not None:
                        finished[i] = True
                        if self.blockmgr is not None:
                            self.blockmgr.step(self.executor_id, free=[seqs[i]])
                    self.last_seen = time.monotonic()
                    yield msg
                if all(finished):
                    break
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
        finally:
            self.num_active -= 1
            if incarnation != self._incarnation:
                return  # a dead incarnation's request: its blocks went with it, the same id may run anew
            self._running.pop(request_id, None)
            if not all(finished):
                self.aborted.append(request_id)
            if self.blockmgr is not None:
                self.blockmgr.step(self.executor_id, free=seqs)  # ids already freed are ignored
            self._abort_flags.discard(request_id)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Run an ASGI app with uvicorn in a background thread; yields its base URL (``http://host:port``).

    Real HTTP on loopback, so streaming, disconnects and the ``openai`` client behave as in
    production, while executors and block manager can be fakes living in the server's loop.
    """
    import socket

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def fake_app(tokenizer, num_executors: int = 1, executor_kwargs: dict | None = None,
             manager: BlockManager | None = None, **settings: Any):
    """An app over ``num_executors`` FakeExecutors sharing one real, in-process block manager.

    Args:
        manager: the block manager (default ``BlockManager()``), e.g. with other eviction or pin
            settings; ``bm.manager`` of the result is it.

    Returns:
        (app, [FakeExecutor], the gateway's BlockManagerConnection). ``settings`` override
        GatewaySettings fields.
    """
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    bm = BlockManagerConnection(manager)
    executors = [FakeExecutor(f"executor-{i}", bm.connect(), tokenizer, **(executor_kwargs or {}))
                 for i in range(num_executors)]
    fields = {"model": "fake-model-dir", "served_model_name": "fake-model", "executors": [], "blockmgr": "",
              "max_model_len": 2048, "health_interval_s": 0.2, **settings}
    app = create_app(GatewaySettings(**fields), executors=executors, blockmgr=bm, tokenizer=tokenizer)
    return app, executors, bm
