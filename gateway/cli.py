"""The ``pagedserve`` command line.

    pagedserve serve [--model PATH] [--port 8000]    # block manager + executor(s) + gateway
    pagedserve keys --keys-dir DIR [--name NAME ...] # CURVE key pairs for the services
    pagedserve blockmgr --bind tcp://127.0.0.1:5557  # one service on its own
    pagedserve executor --blockmgr ... --bind ...
    pagedserve gateway --model ... --executor ...
    pagedserve bench throughput|serve ...            # benchmarks (benchmarks/serving/)

Every flag is also a PAGEDSERVE_* environment variable (`--help` names it); flags win.
"""

from __future__ import annotations

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
    """``pagedserve serve``: check the settings, then start and watch every service's process.

    Each child gets its settings (derived by :meth:`ServeSettings.processes`) as ``PAGEDSERVE_*``
    environment variables, as compose does: nothing is rebuilt as flags, and keys stay out of
    ``ps``.
    """
    from gateway.settings import parse_serve

    settings, parser = parse_serve(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from executor.threads import THREADS_REASON_ENV, default_num_threads

    if settings.executor.num_threads is None:
        num_threads, why = default_num_threads(settings.num_executors)
    else:
        num_threads, why = settings.executor.num_threads, "--num-threads"
    model = settings.executor.model
    if model is not None and not Path(model).exists():
        parser.error(f"--model: {model} does not exist")
    host = settings.gateway.host
    for flag, port in [("--port", settings.gateway.port), ("--blockmgr-port", settings.blockmgr_port)] + [
        ("--executor-base-port", settings.executor_base_port + i) for i in range(settings.num_executors)
    ]:
        if not _port_free(host if flag == "--port" else "127.0.0.1", port):
            parser.error(f"{flag}: port {port} is already in use")

    from blockmgr import security
    from blockmgr.settings import environment_for
    from executor.model_loader import default_model_path, resolve_model_dir
    from gateway.launcher import Child, supervise

    if settings.insecure_local:
        kv_events = settings.blockmgr.kv_events_bind
        if kv_events and not security.is_loopback(kv_events):
            parser.error(f"--insecure-local binds loopback addresses only, not --kv-events-bind {kv_events}")
    else:
        keys_dir = settings.keys_dir or str(security.default_keys_dir())
        names = [security.BLOCKMGR, security.GATEWAY, *(f"executor-{i}" for i in range(settings.num_executors))]
        created = security.create_keys(keys_dir, names)
        if created:
            log.info("created CURVE keys for %s in %s", ", ".join(created), keys_dir)
        others = security.other_executor_keys(keys_dir, names)
        if others:
            log.warning("%s trusts the keys of %s, which this stack does not run (left by a stack with more "
                        "executors?); if nothing of yours uses them, delete %s: a service re-reads the "
                        "directory at each new connection", keys_dir, ", ".join(others),
                        " ".join(str(Path(keys_dir) / f"{n}.{ext}") for n in others for ext in ("key", "key_secret")))
        settings = settings.model_copy(update={"keys_dir": keys_dir})

    model_dir = str(resolve_model_dir(model or default_model_path()))
    children = []
    for name, module, child in settings.processes(model_dir, num_threads):
        env = environment_for(child, dict(os.environ))
        if module == "executor":
            log.info("%s: %d torch threads (%s)", name, num_threads, why)
            # so that the executor's own log says who chose its thread count, and why
            env[THREADS_REASON_ENV] = f"chosen by pagedserve serve: {why}"
        children.append(Child(name, ["-m", module], env=env))
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
