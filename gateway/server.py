"""The gateway process: ``python -m gateway`` (started by ``pagedserve serve``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import uvicorn

from blockmgr import security
from blockmgr.settings import load
from blockmgr.startup_heap import freeze_startup_heap
from executor.client import split_address
from gateway.app import create_app
from gateway.settings import GatewaySettings, default_served_name


def main(argv: list[str] | None = None) -> None:
    """``pagedserve gateway``: settings from flags and ``PAGEDSERVE_*`` variables (:class:`GatewaySettings`)."""
    settings, parser = load(GatewaySettings, argv, "pagedserve gateway", "Run the HTTP gateway.")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.model:
        parser.error("--model: required (the converted model directory: tokenizer files + config.json)")
    if not settings.executors:
        parser.error("--executor: at least one executor address is required")
    # The gateway binds no ZeroMQ socket; --insecure-local only lets it talk to unauthenticated services.
    try:
        keys = security.keys_for(settings, security.GATEWAY)
    except ValueError as exc:
        parser.error(str(exc))
    if keys is not None:
        for address in settings.executors:
            if split_address(address)[0] is None:
                parser.error(f"--executor {address}: name the executor whose key to expect, as EXECUTOR_ID@{address}")
    config_path = Path(settings.model) / "config.json"
    if not config_path.is_file():
        parser.error(f"--model: {config_path} does not exist (the gateway needs a converted model directory)")
    config = json.loads(config_path.read_text())
    settings = settings.model_copy(update={
        "served_model_name": settings.served_model_name or default_served_name(Path(settings.model)),
        "max_model_len": settings.max_model_len or int(config.get("max_position_embeddings", 2048)),
    }).with_keys(keys)
    app = create_app(settings)
    freeze_startup_heap(logging.getLogger("pagedserve.gateway"))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
