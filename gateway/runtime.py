"""The gateway's shared state: settings, tokenizer, executors, router, block manager, metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request

from blockmgr.client import BlockManagerClient, BlockManagerUnavailable
from gateway.errors import APIError, unavailable
from gateway.executors import ExecutorPool
from gateway.metrics import GatewayMetrics
from gateway.routing import Router
from gateway.settings import GatewaySettings
from gateway.tokenization import TokenText

log = logging.getLogger("pagedserve.gateway")


class Gateway:
    """Everything the routes share. Built by :func:`gateway.app.create_app`.

    Args:
        settings: the gateway's configuration.
        executors: executor clients; default one ``ExecutorClient`` per ``settings.executors``.
        blockmgr: a block-manager client (sync API); default a ``BlockManagerClient``.
        tokenizer: a ``transformers`` tokenizer; default loaded from ``settings.model``.
        routing_blockmgr: the client used for ``match_prefix`` (default: a second
            ``BlockManagerClient`` with a short timeout, so routing never waits long).
    """

    def __init__(self, settings: GatewaySettings, executors: list | None = None, blockmgr=None, tokenizer=None,
                 routing_blockmgr=None):
        self.settings = settings
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(settings.model)
        self.tokenizer = tokenizer
        self.token_text = TokenText(tokenizer)
        if executors is None:
            from executor.client import ExecutorClient

            executors = [ExecutorClient(a, keys=settings.keys) for a in settings.executors]
        self.pool = ExecutorPool(executors, settings.health_interval_s, settings.executor_timeout_s)
        self.blockmgr = blockmgr if blockmgr is not None else BlockManagerClient(settings.blockmgr, timeout_s=2.0, keys=settings.keys)
        if routing_blockmgr is None:
            routing_blockmgr = (BlockManagerClient(settings.blockmgr, timeout_s=0.5, keys=settings.keys)
                                if isinstance(self.blockmgr, BlockManagerClient) else self.blockmgr)
        self.router = Router(self.pool, routing_blockmgr)
        self.metrics = GatewayMetrics(settings.served_model_name)
        self.inflight: dict[str, str] = {}  # request_id -> executor_id, for /admin/sequences/{id}

    async def start(self) -> None:
        await self.pool.start()
        log.info("gateway serving %s with %d executor(s), %d answering", self.settings.served_model_name,
                 len(self.pool.handles), len(self.pool.healthy()))

    async def close(self) -> None:
        await self.pool.close()
        for client in {id(c): c for c in (self.blockmgr, self.router.blockmgr)}.values():
            close = getattr(client, "close", None)
            if close:
                close()

    async def bm_call(self, fn, *args, **kwargs):
        """Call a block-manager client method in a thread.

        Raises:
            APIError(503): the block manager did not answer.
            BlockManagerRequestError: it refused the request (the caller decides the status).
        """
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except BlockManagerUnavailable as exc:
            raise unavailable(str(exc), "blockmgr_unavailable") from None

    def check_model(self, model: str | None) -> None:
        """Raises APIError(404, ``model_not_found``, as the OpenAI API answers an unknown model) unless
        ``model`` is None or the served model's name."""
        if model is not None and model != self.settings.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                           f"`{self.settings.served_model_name}`.", "invalid_request_error", "model",
                           "model_not_found")

    def check_capacity(self, num_sequences: int = 1) -> None:
        """Admit ``num_sequences`` more waiting sequences, or raise APIError(429, ``Retry-After``)
        when they would take the waiting queue past ``max_waiting_sequences``. An empty queue takes
        any request (its size is bounded by ``max_sequences_per_request``), so retrying helps."""
        limit = self.settings.max_waiting_sequences
        waiting = self.pool.num_waiting
        if limit and waiting and waiting + num_sequences > limit:
            raise APIError(429, f"the server is overloaded: {waiting} sequences are waiting and this request "
                           f"adds {num_sequences} (limit {limit}); retry shortly", "rate_limit_exceeded", None,
                           "queue_full", headers={"Retry-After": "1"})


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway

