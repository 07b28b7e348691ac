"""The executor process: loads the model, registers its KV pool, and serves the gateway.

The loop alternates between draining the gateway's messages and running one engine step, so a
request that arrives while others decode joins at the next step (continuous batching).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid

import torch
import zmq

from blockmgr import security
from blockmgr.client import BlockManagerClient, BlockManagerUnavailable, StaleIncarnation
from blockmgr.settings import load
from blockmgr.startup_heap import freeze_startup_heap
from executor import protocol
from executor.config import ExecutorSettings
from executor.engine import Engine, RequestOutput
from executor.threads import THREADS_REASON_ENV, default_num_threads, thread_placement, usable_cores

log = logging.getLogger("pagedserve.executor")


def kv_bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers: K and V, ``block_size * kv_heads * head_dim`` each."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


def scheduler_limits(engine: Engine) -> str:
    """The limits ``engine`` schedules under, as the start-up log gives them (block geometry has its
    own "KV cache" line): ``max_model_len`` after the model's default, the per-step caps, and
    whether steps are pipelined with the block manager."""
    sched = engine.scheduler
    pipelined = ("async scheduling (steady decode steps' block-manager requests sent before the forward pass)"
                 if engine.config.async_scheduling else "steps one at a time (--no-async-scheduling)")
    return (f"max_model_len {engine.max_model_len} tokens, max_num_seqs {sched.max_num_seqs}, "
            f"max_num_batched_tokens {sched.max_num_batched_tokens} (token budget per step); {pipelined}")


SEND_HWM = 100_000  # messages (a step's outputs each) queued per gateway before a send fails (and is reported)
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500
STEP_DECAY = 0.99  # per step: the longest step reported forgets a past one within a few hundred steps


def _output_fields(out: RequestOutput) -> dict:
    """One output as its wire fields (``executor/protocol.py``), without ``op``."""
    return {
        "request_id": out.request_id,
        "token_ids": out.new_token_ids,
        "finished": out.finished,
        "finish_reason": out.finish_reason,
        "error": out.error,
        "num_prompt_tokens": out.num_prompt_tokens,
        "num_cached_tokens": out.num_cached_tokens,
        "index": out.index,
        "logprobs": out.logprobs,
        "prompt_logprobs": out.prompt_logprobs,
    }


class ExecutorServer:
    """Bridges the gateway's ROUTER socket and an :class:`Engine`."""

    def __init__(self, engine: Engine, bind: str, info: dict, keys: security.Keys | None = None,
                 max_message_bytes: int = security.MAX_MESSAGE_BYTES):
        if keys is None and not security.is_loopback(bind):
            raise ValueError(f"refusing to serve {bind} without authentication; give keys or bind loopback")
        self.engine = engine
        self.info = info
        self.sock = security.limit(zmq.Context.instance().socket(zmq.ROUTER), max_message_bytes)
        if keys is not None:
            keys.serve(self.sock)
        # A gateway that is gone, or one that no longer reads (its queue at the high-water mark),
        # makes a send fail instead of being dropped silently (ROUTER's default); _send reports it.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        # ZMTP heartbeats, answered by libzmq's I/O thread even in a long step: the gateway
        # sees a dead executor within seconds, and this side drops a dead gateway's connection.
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.sock.bind(bind)
        # request_id -> [gateway identity, unfinished completions, sender's principal]
        self.owner: dict[str, list] = {}
        self.stopping = False
        # Liveness: the gateway counts an executor with requests in flight as hung when its loop
        # reports no progress (outputs, probe replies) for a while; ``info`` tells it how long a
        # step here can take, decayed so one old giant step does not excuse a hang forever.
        self.longest_step_s = 0.0

    def _send(self, identity: bytes, message: dict, what) -> bool:
        """Send to one gateway; returns False (logged, naming ``what``: a string, or a function
        that makes it, called only then) when it cannot be delivered."""
        try:
            self.sock.send_multipart([identity, protocol.encode(message)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: gateway gone; EAGAIN: at the high-water mark
            log.warning("cannot deliver %s to its gateway (%s)", what() if callable(what) else what, exc.strerror)
            return False

    def _send_outputs(self, outputs: list[RequestOutput]) -> None:
        """Send one step's outputs: one ``outputs`` message per gateway (an output carrying prompt
        logprobs, which can be megabytes, goes alone as an ``output`` message).

        Why batched: at 64 running sequences, one message per output cost the step loop about 2 ms
        (36 us each, encoding, libzmq's queue and its I/O thread's wake-ups) on a 2-core machine,
        and the gateway as many receives; one message per step costs a fraction of that.
        """
        batches: dict[bytes, list[RequestOutput]] = {}
        for out in outputs:
            entry = self.owner.get(out.request_id)
            if entry is None:
                continue
            if out.finished:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self.owner[out.request_id]
            if out.prompt_logprobs is not None:
                self._deliver(entry[0], [out])
            else:
                batches.setdefault(entry[0], []).append(out)
        for identity, batch in batches.items():
            self._deliver(identity, batch)

    def _deliver(self, identity: bytes, batch: list[RequestOutput]) -> None:
        if len(batch) == 1:
            message = {"op": "output", **_output_fields(batch[0])}
        else:
            message = {"op": "outputs", "outputs": [_output_fields(out) for out in batch]}

        def what() -> str:
            rids = sorted({out.request_id for out in batch})
            more = f" and {len(rids) - 3} more" if len(rids) > 3 else ""
            return f"{len(batch)} output(s) of request(s) {', '.join(rids[:3])}{more}"

        if self._send(identity, message, what):
            return
        for out in batch:
            if not out.finished:
                # Nobody will read the rest: stop computing it and free its blocks.
                self.owner.pop(out.request_id, None)
                self.engine.abort(out.request_id)

    def _refuse(self, identity: bytes, reason: str, msg: dict | None = None) -> None:
        log.warning("refused a message: %s", reason)
        reply = {"op": "error", "error": reason}
        nonce = (msg or {}).get("nonce")
        if isinstance(nonce, (int, str)):
            reply["nonce"] = nonce
        self._send(identity, reply, "a refusal")

    def _handle(self, identity: bytes, msg: dict, principal: str | None = None) -> None:
        """Validate and apply one gateway message.

        Args:
            principal: the sender's key name (None without authentication). Generating and
                aborting are for operators (the gateway); an abort only reaches requests its
                sender submitted.
        """
        try:
            m = protocol.parse_request(msg)
        except ValueError as exc:
            rid = msg.get("request_id")
            if msg.get("op") == "generate" and isinstance(rid, str) and rid and rid not in self.owner:
                self._send_error(identity, rid, str(exc))
            else:
                self._refuse(identity, str(exc), msg)
            return
        if principal is not None and principal not in security.OPERATORS and m.op in ("generate", "abort", "sequences"):
            self._refuse(identity, f"forbidden: {principal!r} may not {m.op}", msg)
            return
        if m.op == "generate":
            rid = m.request_id
            if rid in self.owner:
                self._refuse(identity, f"request id {rid!r} is already in flight")
                return
            try:
                params = m.sampling_params()
                self.engine.add_request(rid, list(m.prompt_token_ids), params, cache_salt=m.cache_salt,
                                        priority=m.priority, output_token_ids=list(m.output_token_ids or []))
            except (TypeError, ValueError) as exc:
                self._send_error(identity, rid, str(exc))
                return
            self.owner[rid] = [identity, params.n, principal]
        elif m.op == "abort":
            entry = self.owner.get(m.request_id)
            if entry is not None and entry[2] != principal:
                self._refuse(identity, f"forbidden: request {m.request_id!r} belongs to another client")
                return
            if m.index is not None:
                # One completion of an n > 1 request: its siblings go on (and still report).
                if self.engine.abort(m.request_id, m.index) and entry is not None:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self.owner[m.request_id]
            else:
                self.owner.pop(m.request_id, None)
                self.engine.abort(m.request_id)
        else:
            reply = {"op": "reply", "nonce": m.nonce}
            sched = self.engine.scheduler
            if m.op == "info":
                reply.update(self.info)
                reply["num_running"] = len(sched.running)
                reply["num_waiting"] = len(sched.waiting)
                reply["num_swapped"] = len(sched.swapped)
                reply["longest_step_s"] = round(self.longest_step_s, 3)
            elif m.op == "sequences":
                reply["sequences"] = [
                    {"request_id": r.request_id, "state": state, "num_prompt_tokens": len(r.prompt_token_ids),
                     "num_output_tokens": len(r.output_token_ids), "num_computed_tokens": r.num_computed_tokens,
                     "num_blocks": len(r.block_table), "priority": r.priority}
                    for state, queue in (("running", sched.running), ("waiting", sched.waiting),
                                         ("swapped", sched.swapped))
                    for r in queue
                ]
            self._send(identity, reply, f"the reply to {m.op!r}")

    def _send_error(self, identity: bytes, rid: str, error: str) -> None:
        log.warning("refused request %s: %s", rid, error)
        self._send(identity, {
            "op": "output", "request_id": rid, "token_ids": [], "finished": True,
            "finish_reason": "error", "error": error, "num_prompt_tokens": 0,
            "num_cached_tokens": 0, "index": 0,
        }, f"the refusal of request {rid}")

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stopping:
            # Block only when idle; with work queued, just drain what has already arrived.
            timeout = 0 if self.engine.has_work() else 100
            while poller.poll(timeout):
                frames = self.sock.recv_multipart(copy=False)
                identity = frames[0].bytes
                try:
                    msg = protocol.decode(frames[-1].bytes)
                except ValueError as exc:
                    self._refuse(identity, str(exc))
                    continue
                try:
                    self._handle(identity, msg, security.peer_name(frames[-1]))
                except Exception as exc:  # a bug must not take down every request of this executor
                    log.exception("internal error handling %r", msg.get("op"))
                    self._refuse(identity, f"internal error: {exc!r}", msg)
                timeout = 0
            if self.engine.has_work():
                started = time.monotonic()
                try:
                    outputs = self.engine.step()
                except StaleIncarnation as exc:
                    # A newer process owns this executor id: serving on would corrupt its blocks.
                    log.critical("%s", exc)
                    raise SystemExit(f"executor {self.engine.executor_id}: {exc}") from None
                self.longest_step_s = max(time.monotonic() - started, self.longest_step_s * STEP_DECAY)
                self._send_outputs(outputs)


def connect_block_manager(address: str, executor_id: str, num_blocks: int, block_size: int,
                          wait_s: float = 60.0, keys: security.Keys | None = None) -> BlockManagerClient:
    """Wait for the block-manager service to answer (it may start after us).

    Args:
        keys: this executor's keys (principal = ``executor_id``); None for an ``--insecure-local`` stack.
    """
    client = BlockManagerClient(address, timeout_s=2.0, keys=keys)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.ping()
            break
        except BlockManagerUnavailable:
            if time.monotonic() > deadline:
                hint = "; check that its keys directory holds this executor's public key" if keys is not None else ""
                raise SystemExit(f"executor {executor_id}: block manager at {address} did not answer for "
                                 f"{wait_s:.0f}s{hint}")
            log.info("waiting for the block manager at %s", address)
    # Short: a block manager that restarts loses requests in flight; the engine retries them.
    client.timeout_ms = 5_000
    return client


def main(argv: list[str] | None = None) -> None:
    """``pagedserve executor``: settings from flags and ``PAGEDSERVE_*`` variables (:class:`ExecutorSettings`)."""
    settings, parser = load(ExecutorSettings, argv, "pagedserve executor", "Run one executor process.")
    # Every line names the executor (its loader's, the engine's, the kernels'): with several
    # executors on one terminal, a line without it could be any of them.
    tag = settings.executor_id.replace("%", "%%")
    logging.basicConfig(level=settings.log_level, format=f"%(asctime)s %(levelname)s %(name)s [{tag}]: %(message)s")
    # The executor id is its principal: the block manager lets it act on that executor only.
    try:
        keys = security.keys_for(settings, settings.executor_id, [settings.bind])
    except ValueError as exc:
        parser.error(str(exc))
    if settings.num_threads is None:
        num_threads, why = default_num_threads(1)
    else:
        # serve hands its own choice down this way too, with its reason.
        why = os.environ.get(THREADS_REASON_ENV) or (
            f"set by --num-threads / $PAGEDSERVE_NUM_THREADS; {usable_cores()} usable cores")
        num_threads = settings.num_threads
    torch.set_num_threads(num_threads)
    log.info("%d torch threads (%s), %s", num_threads, why, thread_placement())

    from executor.model_loader import default_model_path, load_model, resolve_model_dir

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, settings.dtype)
    model_dir = resolve_model_dir(settings.model or default_model_path())
    model = load_model(model_dir, dtype=dtype, device=device)
    per_block = kv_bytes_per_block(model, settings.block_size, dtype)
    config = settings.with_pool_sizes(per_block)
    log.info("KV cache: %d blocks x %d tokens, %s (%.1f MiB)", config.num_blocks, config.block_size,
             settings.dtype, config.num_blocks * per_block / 2**20)
    # One per process: the block manager drops whatever an earlier process of this id held.
    incarnation = f"{os.getpid()}-{uuid.uuid4().hex[:16]}"
    bm = connect_block_manager(config.blockmgr, config.executor_id, config.num_blocks, config.block_size, keys=keys)
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    engine = Engine(model, bm, config, eos_ids, executor_id=config.executor_id, device=device, dtype=dtype,
                    incarnation=incarnation)
    log.info("scheduler limits: %s", scheduler_limits(engine))
    info = {
        "executor_id": config.executor_id,
        "incarnation": incarnation,
        "device": str(device),
        "model": str(model_dir),
        "num_blocks": config.num_blocks,
        "block_size": config.block_size,
        "max_model_len": engine.max_model_len,
        "async_scheduling": config.async_scheduling,
    }
    server = ExecutorServer(engine, config.bind, info, keys, config.max_message_bytes)

    def stop(signum, _frame):
        log.info("stopping on signal %d", signum)
        server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    freeze_startup_heap(log)
    log.info("serving on %s", config.bind)
    server.serve_forever()
