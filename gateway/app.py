"""The FastAPI app: wires the gateway's parts together; each route area lives in ``gateway/routes``.

``create_app(settings)`` builds everything from the settings. Tests (and other embedders) can
pass stand-ins instead: ``executors`` (objects with the ``executor.client.ExecutorClient``
methods, e.g. ``FakeExecutor`` in tests/gateway/fakes.py), ``blockmgr`` (the block-manager client API) and
``tokenizer``.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from gateway.errors import install_handlers
from gateway.limits import BodySizeLimit
from gateway.routes import admin, cache, chat, completions, metrics, misc
from gateway.runtime import Gateway
from gateway.settings import GatewaySettings
from gateway.streaming import ClientDisconnected

log = logging.getLogger("pagedserve.gateway")

__all__ = ["create_app", "GatewaySettings"]


def _openapi(app: FastAPI):
    """The generated schema, with FastAPI's default 422 replaced by the 400 this API answers."""

    def build():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                responses = op.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {"description": "invalid parameters",
                                        "content": {"application/json": {
                                            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
        return schema

    return build


def create_app(settings: GatewaySettings, *, executors: list | None = None, blockmgr=None, tokenizer=None,
               routing_blockmgr=None) -> FastAPI:
    """Build the gateway app. See :class:`gateway.runtime.Gateway` for the optional stand-ins."""
    gw = Gateway(settings, executors=executors, blockmgr=blockmgr, tokenizer=tokenizer,
                 routing_blockmgr=routing_blockmgr)

    @asynccontextmanager
    async def lifespan(_app):
        await gw.start()
        try:
            yield
        finally:
            await gw.close()

    app = FastAPI(title="pagedserve", version=settings.version, lifespan=lifespan,
                  description="OpenAI-compatible LLM server built on PagedAttention.")
    app.state.gateway = gw
    install_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_request: Request, _exc: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it: the client has gone

    for module in (completions, chat, misc, admin, cache, metrics):
        app.include_router(module.router)
    app.include_router(cache.page_router)
    app.openapi = _openapi(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
