"""Stand-ins for the executor and the block manager, so the gateway runs in process without a model.

``FakeExecutor`` has the methods of ``executor.client.ExecutorClient`` and speaks the same
output messages (index, token_ids, finished, finish_reason, error, num_prompt_tokens,
num_cached_tokens, logprobs, prompt_logprobs). It "generates" a scripted continuation one token
per step, takes KV blocks from a ``FakeBlockManager`` as it goes and returns them when the request
ends or is aborted, and publishes its prompts' full blocks as a prefix cache, so routing and
cache inspection can be tested too.

Used by the gateway's fast tests; also handy for benchmarking the gateway alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from typing import Any, Callable

from blockmgr.client import BlockManagerRequestError, BlockManagerUnavailable
from executor.client import ExecutorUnavailable, expected_outputs

SAMPLING_FIELDS = frozenset({
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens", "seed", "stop_token_ids", "ignore_eos", "logprobs", "prompt_logprobs",
    "n", "use_beam_search", "beam_width", "logit_bias",
})

DEFAULT_REPLY = "Hello there! This is a fake reply, with 你好 and 🙂 in it."


class FakeBlockManager:
    """The block manager's client API (sync, thread-safe) over an in-memory model of its state.

    Attributes:
        down: when True every call raises ``BlockManagerUnavailable``.
        calls: the ops called, in order (for assertions).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.executors: dict[str, dict] = {}
        self.down = False
        self.calls: list[str] = []

    def _enter(self, op: str) -> None:
        self.calls.append(op)
        if self.down:
            raise BlockManagerUnavailable(f"fake block manager is down ({op!r})")

    # -- used by FakeExecutor -------------------------------------------------------------------
    def register(self, executor_id: str, num_device_blocks: int, block_size: int) -> None:
        with self._lock:
            self.executors[executor_id] = {"total": num_device_blocks, "block_size": block_size, "seqs": {},
                                           "cache": set(), "queries": 0, "hits": 0}

    def grow(self, executor_id: str, seq_id: str, num_tokens: int) -> None:
        with self._lock:
            ex = self.executors[executor_id]
            ex["seqs"][seq_id] = max(ex["seqs"].get(seq_id, 0), num_tokens)

    def free(self, executor_id: str, seq_id: str) -> None:
        with self._lock:
            self.executors[executor_id]["seqs"].pop(seq_id, None)

    def publish(self, executor_id: str, token_ids: list[int], cache_salt: str | None) -> None:
        with self._lock:
            ex = self.executors[executor_id]
            bs = ex["block_size"]
            for end in range(bs, len(token_ids) + 1, bs):
                ex["cache"].add((cache_salt, tuple(token_ids[:end])))

    def _cached_tokens(self, ex: dict, token_ids: list[int], cache_salt: str | None) -> int:
        bs = ex["block_size"]
        best = 0
        for end in range(bs, len(token_ids) + 1, bs):
            if (cache_salt, tuple(token_ids[:end])) in ex["cache"]:
                best = end
            else:
                break
        # A full hit still computes the last prompt token.
        return min(best, len(token_ids) - 1) if best else 0

    def lookup(self, executor_id: str, token_ids: list[int], cache_salt: str | None) -> int:
        with self._lock:
            ex = self.executors[executor_id]
            n = self._cached_tokens(ex, token_ids, cache_salt)
            ex["queries"] += len(token_ids)
            ex["hits"] += n
            return n

    def _blocks(self, ex: dict) -> int:
        bs = ex["block_size"]
        return sum(-(-t // bs) for t in ex["seqs"].values())

    # -- the client API -------------------------------------------------------------------------
    def ping(self) -> None:
        self._enter("ping")

    def stats(self, summary: bool = False) -> dict:
        self._enter("stats")
        with self._lock:
            out = {}
            for ex_id, ex in self.executors.items():
                used = self._blocks(ex)
                out[ex_id] = {
                    "block_size": ex["block_size"], "num_seqs": len(ex["seqs"]),
                    "device": {"total": ex["total"], "free": ex["total"] - used, "used": used, "cached_free": 0,
                               "usage_perc": 100.0 * used / ex["total"]},
                    "cpu": {"total": 0, "free": 0, "used": 0},
                    "prefix_cache": {"queries_tokens": ex["queries"], "hits_tokens": ex["hits"],
                                     "cached_blocks": len(ex["cache"])},
                    "preemptions": {"swap": 0, "recompute": 0},
                }
            return out

    def sequence(self, executor_id: str, seq_id: str) -> dict:
        self._enter("sequence")
        with self._lock:
            ex = self.executors.get(executor_id)
            if ex is None or seq_id not in ex["seqs"]:
                raise BlockManagerRequestError(f"unknown sequence {seq_id!r} on executor {executor_id!r}")
            n = -(-ex["seqs"][seq_id] // ex["block_size"])
            return {"seq_id": seq_id, "executor_id": executor_id, "num_tokens": ex["seqs"][seq_id],
                    "state": "running",
                    "blocks": [{"block": i, "refcount": 1, "tier": "device", "hash": None} for i in range(n)]}

    def match_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> dict[str, int]:
        self._enter("match_prefix")
        with self._lock:
            return {ex_id: self._cached_tokens(ex, token_ids, cache_salt) for ex_id, ex in self.executors.items()}

    def reset_prefix_cache(self, executor_id: str | None = None) -> dict:
        self._enter("reset_prefix_cache")
        with self._lock:
            targets = [e for i, e in self.executors.items() if executor_id in (None, i)]
            in_use = sum(self._blocks(e) for e in targets)
            if in_use:
                return {"reset": False, "message": f"{in_use} blocks are in use; nothing was reset"}
            for e in targets:
                e["cache"].clear()
            return {"reset": True, "message": "prefix cache reset"}

    def close(self) -> None:
        pass


def _fake_logprob(token_id: int, pos: int) -> float:
    return -0.05 - 0.1 * ((token_id + pos) % 7)


class FakeExecutor:
    """An in-process executor with ``ExecutorClient``'s methods.

    Args:
        executor_id: its id (as in ``info``).
        blockmgr: the FakeBlockManager it takes blocks from (None: no block accounting).
        tokenizer: used to turn ``reply`` into tokens (and for the vocabulary size).
        reply: the continuation, as text, or a function ``(prompt_ids, params, index) -> token ids``.
        eos_token_id: sent with finish reason ``stop`` when the reply is exhausted.
        token_delay_s: pause between two generated tokens.
        first_token_delay_s: pause before the first output (a queued or prefilling request).
        fail_after_tokens: fail every request with an error output after this many steps.
        known_params: SamplingParams fields it accepts; others are refused like the real executor does.

    Attributes:
        received: every generate message (dicts), for assertions.
        aborted: request ids aborted (by the client or by stopping early).
        aborted_choices: ``(request id, index)`` of single completions aborted.
        down: when True it answers nothing (requests time out, generate never outputs).
        on_disconnect: called by :meth:`crash`, as ``ExecutorClient`` calls it on a lost connection.
    """

    def __init__(self, executor_id: str = "executor-0", blockmgr: FakeBlockManager | None = None, tokenizer=None,
                 reply: str | Callable = DEFAULT_REPLY, eos_token_id: int = 2, num_blocks: int = 256,
                 block_size: int = 16, max_model_len: int = 2048, token_delay_s: float = 0.0,
                 first_token_delay_s: float = 0.0, fail_after_tokens: int | None = None, known_params: frozenset = SAMPLING_FIELDS, vocab_size: int | None = None):
        self.executor_id = executor_id
        self.address = f"fake://{executor_id}"
        self.blockmgr = blockmgr
        self.tokenizer = tokenizer
        self.reply = reply
        self.eos_token_id = eos_token_id
        self.num_blocks, self.block_size, self.max_model_len = num_blocks, block_size, max_model_len
        self.token_delay_s = token_delay_s
        self.first_token_delay_s = first_token_delay_s
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
        self.on_disconnect = None

    def crash(self) -> None:
        """Die as a process does: requests in flight get the client's ``unavailable`` output at once,
        nothing answers until :meth:`restart`."""
        self.down = self._crashed = True
        if self.on_disconnect is not None:
            self.on_disconnect()

    def restart(self) -> None:
        self.down = self._crashed = False

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.blockmgr is not None:
            self.blockmgr.register(self.executor_id, self.num_blocks, self.block_size)

    async def close(self) -> None:
        pass

    async def request(self, op: str, timeout_s: float = 2.0, **fields: Any) -> dict[str, Any]:
        if self.down or op not in ("info", "ping", "sequences"):
            await asyncio.sleep(timeout_s)
            raise ExecutorUnavailable(f"executor at {self.address} did not answer {op!r} within {timeout_s}s")
        self.last_seen = time.monotonic()
        reply: dict[str, Any] = {"op": "reply", "nonce": 0}
        if op == "info":
            reply.update(executor_id=self.executor_id, device="cpu", model="fake", num_blocks=self.num_blocks,
                         block_size=self.block_size, max_model_len=self.max_model_len,
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
        return 0

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

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any],
                       priority: int = 0, cache_salt: str | None = None, output_token_ids: list[int] | None = None):
        self.received.append({"request_id": request_id, "prompt_token_ids": list(prompt_token_ids),
                               "params": dict(params), "priority": priority, "cache_salt": cache_salt,
                               "output_token_ids": list(output_token_ids or [])})
        if self.down:
            await asyncio.Event().wait()  # never answers
        err = self._validate(prompt_token_ids, params)
        if err:
            yield self._error(request_id, err)
            return
        n = expected_outputs(params)
        max_tokens = int(params.get("max_tokens", 16))
        k = params.get("logprobs")
        pk = params.get("prompt_logprobs")
        ignore_eos = bool(params.get("ignore_eos"))
        stop_ids = set(params.get("stop_token_ids") or [])
        seqs = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
        conts = [self._continuation(prompt_token_ids, params, i) for i in range(n)]
        cached = self.blockmgr.lookup(self.executor_id, prompt_token_ids, cache_salt) if self.blockmgr else 0
        run = {"num_prompt": len(prompt_token_ids), "seqs": seqs, "out": {}}
        self._running[request_id] = run
        self.num_active += 1
        finished = [False] * n
        first = True
        try:
            if self.first_token_delay_s:
                await asyncio.sleep(self.first_token_delay_s)
            for step in range(len(output_token_ids or []), max_tokens):
                if self._crashed:
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
                        if self.blockmgr:
                            self.blockmgr.free(self.executor_id, seqs[i])
                        continue
                    cont = conts[i]
                    token = cont[step] if step < len(cont) else self.eos_token_id
                    reason = None
                    if (token == self.eos_token_id and not ignore_eos) or token in stop_ids:
                        reason = "stop"
                    elif step + 1 >= max_tokens:
                        reason = "length"
                    run["out"][seqs[i]] = step + 1
                    if self.blockmgr:
                        self.blockmgr.grow(self.executor_id, seqs[i], len(prompt_token_ids) + step + 1)
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
                    first = False
                    if reason is not None:
                        finished[i] = True
                        if self.blockmgr:
                            self.blockmgr.free(self.executor_id, seqs[i])
                            if all(finished):
                                self.blockmgr.publish(self.executor_id, prompt_token_ids, cache_salt)
                    self.last_seen = time.monotonic()
                    yield msg
                if all(finished):
                    break
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
        finally:
            self.num_active -= 1
            self._running.pop(request_id, None)
            if not all(finished):
                self.aborted.append(request_id)
            if self.blockmgr:
                for s in seqs:
                    self.blockmgr.free(self.executor_id, s)
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


@functools.lru_cache(maxsize=4)
def cached_tokenizer(model_dir: str):
    """A tokenizer loaded once per process (tests build many apps)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def fake_app(tokenizer, num_executors: int = 1, executor_kwargs: dict | None = None, **settings: Any):
    """An app over ``num_executors`` FakeExecutors sharing one FakeBlockManager.

    Returns:
        (app, [FakeExecutor], FakeBlockManager). ``settings`` override GatewaySettings fields.
    """
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    bm = FakeBlockManager()
    executors = [FakeExecutor(f"executor-{i}", bm, tokenizer, **(executor_kwargs or {})) for i in range(num_executors)]
    fields = {"model_dir": "fake-model-dir", "served_model_name": "fake-model", "executors": [], "blockmgr": "",
              "max_model_len": 2048, "health_interval_s": 0.2, **settings}
    app = create_app(GatewaySettings(**fields), executors=executors, blockmgr=bm, tokenizer=tokenizer)
    return app, executors, bm
