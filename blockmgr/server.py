"""The block-manager service: one ZeroMQ ROUTER socket, one thread, one :class:`BlockManager`.

Run it with ``pagedserve blockmgr --keys-dir DIR --bind tcp://127.0.0.1:5557`` (or ``python -m
blockmgr``). Clients authenticate with CURVE keys (:mod:`blockmgr.security`); every request is
validated (:func:`blockmgr.protocol.parse_request`) and authorized by its sender's key
(:func:`authorize`) before it touches state. A bad message gets an error reply and is logged; it
never stops the service.
"""

from __future__ import annotations

import logging
import signal
import time

import zmq

from blockmgr import cache_index, pins, protocol, security
from blockmgr.config import BlockManagerSettings
from blockmgr.manager import BlockManager, BlockManagerError, StaleIncarnationError, UnknownExecutorError
from blockmgr.security import OPERATORS
from blockmgr.settings import load
from blockmgr.startup_heap import freeze_startup_heap

log = logging.getLogger("pagedserve.blockmgr")


def authorize(request, principal: str | None) -> None:
    """Refuse a request its sender may not make (see :mod:`blockmgr.security`).

    An executor (principal = its executor id) acts on its own state only; ``stats`` and
    ``match_prefix`` (which reveal every executor's cache) and acting on other executors are for
    the operators (gateway, block manager). ``principal`` None: no authentication (in process,
    or ``--insecure-local``).

    Raises:
        PermissionError: the sender may not make this request.
    """
    if principal is None or principal in OPERATORS or request.op == "ping":
        return
    if request.op in ("register", "step", "sequence", "reset_prefix_cache"):
        if request.executor_id == principal:
            return
        raise PermissionError(f"{principal!r} may not {request.op} executor {request.executor_id!r}")
    raise PermissionError(f"{principal!r} may not {request.op}")


def handle(manager: BlockManager, message: dict, principal: str | None = None) -> dict:
    """Validate one decoded request, check its sender may make it, and apply it; always returns a reply map.

    Args:
        principal: the authenticated sender (its CURVE key's name), or None without authentication.
    """
    try:
        r = protocol.parse_request(message)
        authorize(r, principal)
        if r.op == "ping":
            return protocol.ok()
        if r.op == "register":
            return protocol.ok(**manager.register(r.executor_id, r.num_device_blocks, r.block_size,
                                                  r.num_cpu_blocks, r.cost.model_dump(), r.incarnation))
        if r.op == "step":
            return protocol.ok(**manager.step(r.executor_id, step_id=r.step_id, fork=r.fork, free=r.free,
                                              grow=r.grow, swap_in=r.swap_in, admit=r.admit,
                                              incarnation=r.incarnation))
        if r.op == "stats":
            return protocol.ok(executors=manager.stats(summary=r.summary))
        if r.op == "sequence":
            return protocol.ok(sequence=manager.sequence(r.executor_id, r.seq_id))
        if r.op == "match_prefix":
            return protocol.ok(matches=manager.match_prefix(r.token_ids, r.cache_salt))
        if r.op == "reset_prefix_cache":
            return protocol.ok(**manager.reset_prefix_cache(r.executor_id))
        return _cache_op(manager, r)
    except protocol.ProtocolError as exc:
        return protocol.error(str(exc), "invalid")
    except StaleIncarnationError as exc:
        return protocol.error(str(exc), "stale_incarnation")
    except UnknownExecutorError as exc:
        return protocol.error(str(exc), "unknown_executor")
    except BlockManagerError as exc:
        return protocol.error(str(exc))
    except PermissionError as exc:
        return protocol.error(f"forbidden: {exc}")
    except pins.PinError as exc:
        return protocol.error(str(exc), exc.code)


def _cache_op(manager: BlockManager, r) -> dict:
    """The cache inspection and pinning ops (``blockmgr.cache_index``, ``blockmgr.pins``)."""
    if r.op == "cache_lookup":
        return protocol.ok(executors=cache_index.lookup(manager, r.token_ids, r.cache_salt))
    if r.op == "cache_prefixes":
        return protocol.ok(**cache_index.list_prefixes(manager, r.executor_id, r.offset, r.limit, r.max_tokens))
    if r.op == "pin":
        return protocol.ok(**pins.pin(manager, r.token_ids, r.cache_salt, r.prefix_id, r.executor_id, r.ttl_s))
    if r.op == "unpin":
        return protocol.ok(**pins.unpin(manager, r.pin_id))
    if r.op == "block_map":
        return protocol.ok(executors=cache_index.block_map(manager))
    return protocol.ok(pins=pins.list_pins(manager))


#: Requests recorded in the step log (replayed in order after a restart).
MUTATING_OPS = ("register", "step", "reset_prefix_cache")
#: Admin requests that change pins (``pins`` may expire some): rare, so persisted as full snapshots.
PIN_OPS = ("pin", "unpin", "pins")


class KVEventPublisher:
    """Publishes KV events on a ZeroMQ PUB socket as ``[timestamp, [event, ...]]`` msgpack batches.

    Args:
        keys: with keys, only subscribers holding a trusted key receive anything (CURVE).
    """

    def __init__(self, bind: str, keys: security.Keys | None = None):
        self.sock = security.limit(zmq.Context.instance().socket(zmq.PUB))
        if keys is not None:
            keys.serve(self.sock)
        self.sock.bind(bind)
        log.info("publishing KV events on %s", bind)

    def __call__(self, events: list) -> None:
        self.sock.send(protocol.encode([time.time(), events]))


def serve(bind: str, manager: BlockManager | None = None, store=None, keys: security.Keys | None = None,
          max_message_bytes: int = security.MAX_MESSAGE_BYTES) -> None:
    """Answer requests on ``bind`` until SIGINT/SIGTERM.

    Args:
        manager: the state machine (a fresh one by default).
        store: a :class:`~blockmgr.persistence.RedisStore`; every change is recorded in it before
            the reply is sent (see :mod:`blockmgr.persistence` for what happens while it is down).
        keys: the block manager's keys; only trusted clients connect, and each is authorized by
            its key's name. None: no authentication, which only a loopback ``bind`` allows.
        max_message_bytes: longer requests are dropped unread.

    Raises:
        ValueError: no keys and a non-loopback ``bind``.
    """
    if keys is None and not security.is_loopback(bind):
        raise ValueError(f"refusing to serve {bind} without authentication; give keys or bind loopback")
    manager = manager or BlockManager()
    ctx = zmq.Context.instance()
    sock = security.limit(ctx.socket(zmq.ROUTER), max_message_bytes)
    if keys is not None:
        keys.serve(sock)
    sock.bind(bind)
    log.info("block manager listening on %s", bind)
    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        log.info("block manager stopping on signal %d", signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    try:
        while not stopping:
            if store is not None:
                store.heal(manager)  # Redis back: full snapshots now, not at the next change
            if not poller.poll(200):
                continue
            # TTLs run on the wall clock, so expiry happens here, outside any logged request (a
            # replayed step must change exactly what it changed the first time), and is persisted
            # as a snapshot.
            if pins.expire(manager) and store is not None:
                store.record_snapshot(manager)
            frames = sock.recv_multipart(copy=False)
            identity, payload = frames[0].bytes, frames[-1]
            principal = security.peer_name(payload)
            message = None
            try:
                message = protocol.decode(payload.bytes)
                reply = handle(manager, message, principal)
                if store is not None and reply["ok"] and message.get("op") in MUTATING_OPS:
                    # Durable before the reply goes out; with Redis down, served from memory.
                    reply["durable"] = store.record(manager, message, payload.bytes)
                elif store is not None and reply["ok"] and message.get("op") in PIN_OPS:
                    reply["durable"] = store.record_snapshot(manager)
            except protocol.ProtocolError as exc:
                reply = protocol.error(str(exc), "invalid")
            except Exception as exc:  # a bug must not take the service down with every executor
                log.exception("internal error handling %r", (message or {}).get("op"))
                reply = protocol.error(f"internal error: {exc!r}")
                if store is not None:
                    store.invalidate(manager)  # the failed request may have changed some state
            if not reply["ok"]:
                log.warning("request from %s refused: %s", principal or "an unauthenticated peer", reply["error"])
            sock.send_multipart([identity, protocol.encode(reply)])
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    """``pagedserve blockmgr``: settings from flags and ``PAGEDSERVE_*`` variables (:class:`BlockManagerSettings`)."""
    settings, parser = load(BlockManagerSettings, argv, "pagedserve blockmgr", "Run the block-manager service.")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        keys = security.keys_for(settings, security.BLOCKMGR, [settings.bind, settings.kv_events_bind])
    except ValueError as exc:
        parser.error(str(exc))
    # Frozen before the manager exists: its sequences and blocks come and go and stay collectable.
    freeze_startup_heap(log)
    publisher = KVEventPublisher(settings.kv_events_bind, keys) if settings.kv_events_bind else None
    manager = BlockManager(settings.watermark, settings.prefix_caching, on_events=publisher,
                           eviction=settings.eviction, pin_share=settings.pin_share)
    store = None
    if settings.redis_url:
        from blockmgr.persistence import RedisStore

        store = RedisStore(settings.redis_url, compact_every=settings.redis_compact_every)
        try:
            store.ping()
            store.load(manager)
        except Exception as exc:
            parser.error(f"--redis-url: cannot load state from Redis at {settings.redis_url}: {exc}")
    serve(settings.bind, manager, store, keys, settings.max_message_bytes)
