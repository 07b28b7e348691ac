"""The gateway process: ``python -m gateway`` (started by ``pagedserve serve``)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import uvicorn

from blockmgr import security
from executor.client import split_address
from gateway.app import create_app
from gateway.settings import GatewaySettings, add_gateway_flags, api_keys_from, limits_from


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagedserve gateway", description="Run the HTTP gateway.")
    parser.add_argument("--model-dir", required=True, help="converted model directory (tokenizer + config.json)")
    parser.add_argument("--served-model-name", default=None, help="model name clients send (default: the directory's name)")
    parser.add_argument("--executor", action="append", required=True,
                        help="an executor's ZeroMQ address, with keys prefixed by its executor id: "
                             "executor-0@tcp://127.0.0.1:5560 (repeatable)")
    parser.add_argument("--blockmgr", default="tcp://127.0.0.1:5557")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--log-level", default="INFO")
    add_gateway_flags(parser)
    security.add_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The gateway binds no ZeroMQ socket; --insecure-local only lets it talk to unauthenticated services.
    keys = security.from_args(parser, args, security.GATEWAY)
    if keys is not None:
        for address in args.executor:
            if split_address(address)[0] is None:
                parser.error(f"--executor {address}: name the executor whose key to expect, as EXECUTOR_ID@{address}")
    config_path = Path(args.model_dir) / "config.json"
    if not config_path.is_file():
        parser.error(f"--model-dir: {config_path} does not exist")
    if args.max_body_bytes < 1024:
        parser.error("--max-body-bytes must be >= 1024")
    try:
        limits = limits_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    config = json.loads(config_path.read_text())
    max_len = args.max_model_len or int(config.get("max_position_embeddings", 2048))
    settings = GatewaySettings(
        model_dir=args.model_dir,
        served_model_name=args.served_model_name or Path(args.model_dir).name,
        executors=args.executor,
        blockmgr=args.blockmgr,
        max_model_len=max_len,
        api_keys=api_keys_from(args),
        admin_key=args.admin_key or None,
        metrics_need_admin=args.metrics_need_admin,
        isolate_tenants=not args.shared_prefix_cache,
        max_body_bytes=args.max_body_bytes,
        keys=keys,
        **limits,
    )
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level.lower())
