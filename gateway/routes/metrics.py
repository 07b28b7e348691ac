"""GET /metrics: Prometheus text format (see :mod:`gateway.metrics` for the metric names)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.errors import APIError
from gateway.metrics import CONTENT_TYPE
from gateway.runtime import get_gateway

router = APIRouter(tags=["server"])
log = logging.getLogger("pagedserve.gateway")


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                             "description": "Prometheus exposition text"}})
async def metrics(request: Request):
    gw = get_gateway(request)
    try:
        stats = await gw.bm_call(gw.blockmgr.stats)
    except (APIError, Exception) as exc:  # scrape what we have; the block manager's part is absent
        log.debug("metrics without block-manager stats: %s", exc)
        stats = None
    await gw.pool.probe_all(timeout_s=0.5)  # queue lengths as of this scrape, not the last health probe
    gw.metrics.update(stats, {h.executor_id: h.info for h in gw.pool.handles if h.info})
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE)
