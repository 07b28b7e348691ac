"""The block-manager service: one ZeroMQ ROUTER socket, one thread, one :class:`BlockManager`.

Run it with ``pagedserve blockmgr --bind tcp://127.0.0.1:5557`` (or ``python -m blockmgr``).
A bad message gets an error reply and is logged; it never stops the service.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time

import zmq

from blockmgr import protocol
from blockmgr.manager import BlockManager, BlockManagerError, StaleIncarnationError, UnknownExecutorError

log = logging.getLogger("pagedserve.blockmgr")


def handle(manager: BlockManager, message: dict) -> dict:
    """Dispatch one decoded request to the manager; always returns a reply map."""
    op = message.get("op")
    try:
        if op == "ping":
            return protocol.ok()
        if op == "register":
            return protocol.ok(
                **manager.register(
                    str(message["executor_id"]),
                    int(message["num_device_blocks"]),
                    int(message["block_size"]),
                    int(message.get("num_cpu_blocks", 0)),
                    {k: v for k, v in (message.get("cost") or {}).items()
                     if k in ("bytes_per_block", "copy_bandwidth", "flops_per_token", "flops_per_s")},
                    _opt_str(message.get("incarnation")),
                )
            )
        if op == "step":
            step_id = message.get("step_id")
            return protocol.ok(**manager.step(
                str(message["executor_id"]),
                step_id=int(step_id) if step_id is not None else None,
                fork=[(str(p), str(c)) for p, c in message.get("fork", [])],
                free=[str(s) for s in message.get("free", [])],
                grow=[(str(s), int(n), [int(t) for t in toks]) for s, n, toks in message.get("grow", [])],
                swap_in=[str(s) for s in message.get("swap_in", [])],
                admit=[(str(s), [int(t) for t in prompt], int(n), None if salt is None else str(salt), int(prio))
                       for s, prompt, n, salt, prio in message.get("admit", [])],
                incarnation=_opt_str(message.get("incarnation")),
            ))
        if op == "stats":
            return protocol.ok(executors=manager.stats())
        if op == "sequence":
            return protocol.ok(sequence=manager.sequence(str(message["executor_id"]), str(message["seq_id"])))
        if op == "match_prefix":
            salt = message.get("cache_salt")
            return protocol.ok(matches=manager.match_prefix(
                [int(t) for t in message["token_ids"]], None if salt is None else str(salt)))
        if op == "reset_prefix_cache":
            ex_id = message.get("executor_id")
            return protocol.ok(**manager.reset_prefix_cache(None if ex_id is None else str(ex_id)))
        return protocol.error(f"unknown op {op!r}; expected one of {', '.join(protocol.OPS)}")
    except KeyError as exc:
        return protocol.error(f"op {op!r} is missing field {exc.args[0]!r}")
    except (TypeError, ValueError) as exc:
        return protocol.error(f"op {op!r} has a malformed field: {exc}")
    except StaleIncarnationError as exc:
        return protocol.error(str(exc), "stale_incarnation")
    except UnknownExecutorError as exc:
        return protocol.error(str(exc), "unknown_executor")
    except BlockManagerError as exc:
        return protocol.error(str(exc))


def _opt_str(value) -> str | None:
    return None if value is None else str(value)


MUTATING_OPS = ("register", "step", "reset_prefix_cache")


class KVEventPublisher:
    """Publishes KV events on a ZeroMQ PUB socket as ``[timestamp, [event, ...]]`` msgpack batches."""

    def __init__(self, bind: str):
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(bind)
        log.info("publishing KV events on %s", bind)

    def __call__(self, events: list) -> None:
        self.sock.send(protocol.encode([time.time(), events]))


def serve(bind: str, manager: BlockManager | None = None, store=None) -> None:
    """Answer requests on ``bind`` until SIGINT/SIGTERM.

    Args:
        manager: the state machine (a fresh one by default).
        store: a :class:`~blockmgr.persistence.RedisStore`; every change is recorded in it before
            the reply is sent (see :mod:`blockmgr.persistence` for what happens while it is down).
    """
    manager = manager or BlockManager()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
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
            frames = sock.recv_multipart()
            identity, payload = frames[0], frames[-1]
            message = None
            try:
                message = protocol.decode(payload)
                reply = handle(manager, message)
                if store is not None and reply["ok"] and message.get("op") in MUTATING_OPS:
                    # Durable before the reply goes out; with Redis down, served from memory.
                    reply["durable"] = store.record(manager, message, payload)
            except protocol.ProtocolError as exc:
                reply = protocol.error(str(exc))
            except Exception as exc:  # a bug must not take the service down with every executor
                log.exception("internal error handling %r", (message or {}).get("op"))
                reply = protocol.error(f"internal error: {exc!r}")
                if store is not None:
                    store.invalidate(manager)  # the failed request may have changed some state
            if not reply["ok"]:
                log.warning("request refused: %s", reply["error"])
            sock.send_multipart([identity, protocol.encode(reply)])
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagedserve blockmgr", description="Run the block-manager service.")
    parser.add_argument("--bind", default="tcp://127.0.0.1:5557", help="ZeroMQ address to bind (default %(default)s)")
    parser.add_argument("--kv-events-bind", default=None, help="ZeroMQ PUB address for KV events (default: off)")
    parser.add_argument("--redis-url", default=None, help="keep durable state in Redis, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--redis-compact-every", type=int, default=10_000,
                        help="most step-log records per executor before a full snapshot replaces them; a log as "
                             "large as its snapshot is compacted sooner (default %(default)s)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    parser.add_argument("--watermark", type=float, default=0.01,
                        help="fraction of device blocks kept free at admission (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.watermark < 1:
        parser.error("--watermark must be in [0, 1)")
    publisher = KVEventPublisher(args.kv_events_bind) if args.kv_events_bind else None
    manager = BlockManager(args.watermark, not args.no_prefix_caching, on_events=publisher)
    store = None
    if args.redis_url:
        from blockmgr.persistence import RedisStore

        if args.redis_compact_every < 1:
            parser.error("--redis-compact-every must be >= 1")
        store = RedisStore(args.redis_url, compact_every=args.redis_compact_every)
        try:
            store.ping()
            store.load(manager)
        except Exception as exc:
            parser.error(f"--redis-url: cannot load state from Redis at {args.redis_url}: {exc}")
    serve(args.bind, manager, store)
