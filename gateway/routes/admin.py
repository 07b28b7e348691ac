"""Admin endpoints for cache inspection; they need ``--admin-key`` as a bearer token, or, without
one, a loopback client (see :mod:`gateway.auth`).

- ``GET /admin/cache``: the block manager's stats per executor and tier (``{"executors": {...}}``).
- ``GET /admin/sequences``: waiting, running and swapped sequences of every executor (the
  executors' ``sequences`` op).
- ``GET /admin/sequences/{request_id}``: the block tables of a request's sequences (the block
  manager's ``sequence`` op): each block's id, refcount, tier and hash.
- ``POST /admin/cache/reset``: a prefix-cache reset. 200 with ``reset: true`` only if it happened;
  409 with ``reset: false`` and the block manager's reason when blocks in use kept it from
  happening; 404 for an unknown ``executor_id``; 501 when the block manager has no such operation.
- ``GET /admin/executors``: each executor's id, address, device, model, pool sizes, load, health.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from blockmgr.client import BlockManagerRequestError
from executor.client import ExecutorUnavailable
from gateway.auth import require_admin
from gateway.errors import APIError
from gateway.routes.common import errors
from gateway.runtime import get_gateway

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])
_ERRORS = errors(401, 403, 503)


class CacheStats(BaseModel):
    executors: dict[str, dict[str, Any]]


class SequenceSummary(BaseModel):
    request_id: str
    executor_id: str
    state: str
    num_prompt_tokens: Optional[int] = None
    num_output_tokens: Optional[int] = None
    num_blocks: Optional[int] = None


class SequenceList(BaseModel):
    sequences: list[SequenceSummary]
    errors: dict[str, str]


class SequenceDetail(BaseModel):
    request_id: str
    executor_id: str
    sequences: list[dict[str, Any]]


class ResetResult(BaseModel):
    reset: bool
    message: str
    detail: Optional[dict[str, Any]] = None


class ExecutorStatus(BaseModel):
    executor_id: str
    address: str
    healthy: bool
    device: Optional[str] = None
    model: Optional[str] = None
    num_blocks: Optional[int] = None
    block_size: Optional[int] = None
    max_model_len: Optional[int] = None
    async_scheduling: Optional[bool] = None  # block-manager requests sent ahead of the forward pass
    num_running: Optional[int] = None
    num_waiting: Optional[int] = None
    num_swapped: Optional[int] = None
    in_flight: int
    last_seen_s_ago: Optional[float] = None
    error: Optional[str] = None


class ExecutorList(BaseModel):
    executors: list[ExecutorStatus]


def _refused(exc: BlockManagerRequestError) -> APIError:
    if "unknown op" in str(exc):
        return APIError(501, f"the block manager does not support this: {exc}", "not_implemented", None,
                        "unsupported_by_blockmgr")
    return APIError(409, f"the block manager refused: {exc}", "invalid_request_error", None, "blockmgr_refused")


@router.get("/cache", response_model=CacheStats, responses=_ERRORS)
async def cache_stats(request: Request):
    gw = get_gateway(request)
    try:
        return {"executors": await gw.bm_call(gw.blockmgr.stats)}
    except BlockManagerRequestError as exc:
        raise _refused(exc) from None


@router.post("/cache/reset", response_model=ResetResult,
             responses={**_ERRORS, 409: {"model": ResetResult, "description": "not reset: blocks in use"},
                        **errors(400, 404, 501)})
async def reset_cache(request: Request, executor_id: Optional[str] = Query(None, min_length=1, max_length=256)):
    gw = get_gateway(request)
    fn = getattr(gw.blockmgr, "reset_prefix_cache", None)
    if fn is None:
        raise APIError(501, "the block manager client has no prefix-cache reset", "not_implemented", None,
                       "unsupported_by_blockmgr")
    try:
        reply = await gw.bm_call(fn, executor_id)
    except BlockManagerRequestError as exc:
        if "unknown executor" in str(exc):  # 409 here means "blocks in use", with a ResetResult body
            raise APIError(404, str(exc), "not_found_error", "executor_id", "executor_not_found") from None
        raise _refused(exc) from None
    reset = bool(reply.get("reset"))
    detail = {k: v for k, v in reply.items() if k not in ("reset", "message")}
    body = {"reset": reset, "message": str(reply.get("message") or ("prefix cache reset" if reset else "not reset")),
            "detail": detail or None}
    return JSONResponse(body, status_code=200 if reset else 409)


async def _sequences_of(h) -> list[dict]:
    reply = await h.client.request("sequences", timeout_s=2.0)
    return [{**s, "executor_id": h.executor_id} for s in reply.get("sequences") or []]


@router.get("/sequences", response_model=SequenceList, responses=_ERRORS)
async def list_sequences(request: Request):
    gw = get_gateway(request)
    out, errs = [], {}
    results = await asyncio.gather(*(_sequences_of(h) for h in gw.pool.handles), return_exceptions=True)
    for h, res in zip(gw.pool.handles, results):
        if isinstance(res, ExecutorUnavailable):
            errs[h.executor_id] = f"{res} (an executor without the `sequences` op does not answer it)"
        elif isinstance(res, Exception):
            errs[h.executor_id] = f"{type(res).__name__}: {res}"
        else:
            out += res
    return {"sequences": out, "errors": errs}


def _belongs(seq_request_id: str, request_id: str) -> bool:
    return seq_request_id == request_id or seq_request_id.startswith(request_id + "-") or \
        seq_request_id.startswith(request_id + "#") or seq_request_id.startswith(request_id + ":")


@router.get("/sequences/{request_id}", response_model=SequenceDetail, responses={**_ERRORS, **errors(404)})
async def sequence_detail(request_id: str, request: Request):
    gw = get_gateway(request)
    owner = gw.inflight.get(request_id)
    handles = [h for h in gw.pool.handles if owner is None or h.executor_id == owner]
    found_on, tables = None, []
    for h in handles:
        candidates = [request_id]
        try:
            candidates += [s.get("seq_id") or s["request_id"] for s in await _sequences_of(h)
                           if _belongs(str(s.get("request_id")), request_id)]
        except (ExecutorUnavailable, KeyError):
            pass
        for seq_id in dict.fromkeys(candidates):
            try:
                tables.append(await gw.bm_call(gw.blockmgr.sequence, h.executor_id, seq_id))
                found_on = h.executor_id
            except BlockManagerRequestError:
                continue
        if tables:
            break
    if not tables:
        raise APIError(404, f"no sequence of request {request_id!r} holds blocks on any executor", "not_found_error",
                       "request_id", "sequence_not_found")
    return {"request_id": request_id, "executor_id": found_on, "sequences": tables}


@router.get("/executors", response_model=ExecutorList, responses=_ERRORS)
async def list_executors(request: Request):
    gw = get_gateway(request)
    await gw.pool.probe_all(timeout_s=1.0)
    now = time.monotonic()
    out = []
    for h in gw.pool.handles:
        info = h.info
        last = h.client.last_seen
        out.append({
            "executor_id": h.executor_id, "address": h.address, "healthy": h.healthy,
            **{k: info.get(k) for k in ("device", "model", "num_blocks", "block_size", "max_model_len",
                                        "async_scheduling", "num_running", "num_waiting", "num_swapped")},
            "in_flight": h.load, "last_seen_s_ago": None if last is None else round(now - last, 3),
            "error": h.last_probe_error,
        })
    return {"executors": out}
