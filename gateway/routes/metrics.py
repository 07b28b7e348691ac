"""GET /metrics: Prometheus text format (see :mod:`gateway.metrics` for the metric names).

Its cost does not grow with the number of KV blocks: it asks the block manager for a summary of
counters and the executors for ``info``. With ``--metrics-need-admin`` it is guarded like
``/admin/*``."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.auth import require_metrics_access
from gateway.errors import APIError
from gateway.metrics import CONTENT_TYPE
from gateway.runtime import get_gateway

router = APIRouter(tags=["server"])
log = logging.getLogger("pagedserve.gateway")


@router.get("/metrics", response_class=Response, dependencies=[Depends(require_metrics_access)],
            responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                             "description": "Prometheus exposition text"}})
async def metrics(request: Request):
    gw = get_gateway(request)
    try:
        # The summary leaves out what costs O(blocks) to compute (fill, cached free blocks).
        stats = await gw.bm_call(gw.blockmgr.stats, summary=True)
    except (APIError, Exception) as exc:  # scrape what we have; the block manager's part is absent
        log.debug("metrics without block-manager stats: %s", exc)
        stats = None
    await gw.pool.probe_all(timeout_s=0.5)  # queue lengths as of this scrape, not the last health probe
    gw.metrics.update(stats, {h.executor_id: h.info for h in gw.pool.handles if h.info})
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE)
