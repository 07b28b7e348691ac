"""Admin endpoints that inspect and steer the prefix cache (same auth as :mod:`gateway.routes.admin`).

- ``POST /admin/cache/lookup``: a prompt (text, chat messages or token ids, and a cache salt) ->
  per executor how many of its leading tokens are cached, on the device, on the CPU tier, pinned.
- ``GET /admin/cache/prefixes``: the cached prefix chains, most hit first, paged.
- ``POST /admin/cache/pin``: pin a prompt's cached prefix (or a prefix id), optionally with a TTL;
  ``DELETE /admin/cache/pin/{pin_id}`` unpins; ``GET /admin/cache/pins`` lists the pins.
- ``GET /admin/cache/blocks``: each executor's block map (one character per block).
- ``GET /admin/``: the live cache page (``gateway/static/cache.html``, plain HTML/JS): block maps,
  hit rate over time, top prefixes with pin buttons, and a lookup box. The page holds no data and
  is served without auth; its requests to the endpoints above carry the admin key if one is set
  (it asks for it on a 401).

The block manager does the work (``blockmgr.cache_index``, ``blockmgr.pins``); a block-manager
client without these operations gives 501.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import Field, model_validator

from blockmgr.client import BlockManagerRequestError
from gateway.auth import require_admin
from gateway.errors import APIError, bad_request
from gateway.openai_protocol import ChatMessage, RequestBody, TokenId, _Base
from gateway.routes.common import errors
from gateway.runtime import get_gateway
from gateway.tokenization import chat_prompt, completion_prompts

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])
page_router = APIRouter(tags=["admin"])
_PAGE = Path(__file__).resolve().parent.parent / "static" / "cache.html"
_ERRORS = errors(400, 401, 403, 501, 503)


class PromptSpec(RequestBody):
    """A prompt as a completions ``prompt`` (text or token ids) or as chat ``messages``."""

    prompt: Optional[Union[str, list[TokenId]]] = Field(None, description="text, or token ids")
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, description="chat messages (model template)")
    add_generation_prompt: bool = True
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=1024)


class LookupRequest(PromptSpec):
    endpoint: ClassVar[str] = "POST /admin/cache/lookup"

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class PinRequest(PromptSpec):
    endpoint: ClassVar[str] = "POST /admin/cache/pin"

    prefix_id: Optional[str] = Field(None, min_length=1, max_length=300,
                                     description="a prefix id from GET /admin/cache/prefixes, instead of a prompt")
    executor_id: Optional[str] = Field(None, min_length=1, max_length=300, description="pin only on this executor")
    ttl_s: Optional[float] = Field(None, gt=0, le=31536000, description="seconds until the pin expires")

    @model_validator(mode="after")
    def _one_target(self):
        if sum(x is not None for x in (self.prompt, self.messages, self.prefix_id)) != 1:
            raise ValueError("give exactly one of prompt, messages and prefix_id")
        return self


class ExecutorLookup(_Base):
    cached_tokens: int
    device_tokens: int
    cpu_tokens: int
    pinned_tokens: int
    num_tokens: int
    block_size: int
    prefix_id: Optional[str] = None


class LookupResult(_Base):
    num_tokens: int
    executors: dict[str, ExecutorLookup]


class Prefix(_Base):
    id: str
    executor_id: str
    text: str = Field(description="the chain's first tokens as text")
    first_token_ids: list[int]
    num_blocks: int
    num_tokens: int
    hits: int = Field(description="admissions that reused the whole chain")
    partial_hits: int = Field(description="admissions that reused at least its first block")
    last_use: float = Field(description="Unix seconds")
    pinned: bool = Field(description="every block of the chain is pinned")
    pinned_blocks: int = Field(description="how many of its blocks are pinned")
    tier: str = Field(description="device, cpu or mixed")


class PrefixList(_Base):
    total: int
    offset: int
    limit: int
    prefixes: list[Prefix]


class PinInfo(_Base):
    pin_id: str
    executor_id: str
    num_blocks: int
    num_tokens: int
    created_at: Optional[float] = None
    expires_at: Optional[float] = None


class PinList(_Base):
    pins: list[PinInfo]


class Unpinned(_Base):
    pin_id: str
    executor_id: str
    num_blocks: int


class BlockMaps(_Base):
    executors: dict[str, dict[str, Any]] = Field(
        description="per executor: device and cpu, one character per block: '.' free, 'c' cached, 'u' in use, "
                    "'p' pinned")


_STATUS = {"not_cached": (404, "not_found_error"), "unknown_pin": (404, "not_found_error"),
           "pin_does_not_fit": (409, "invalid_request_error"), "invalid": (400, "invalid_request_error")}


async def _call(request: Request, name: str, *args):
    gw = get_gateway(request)
    fn = getattr(gw.blockmgr, name, None)
    if fn is None:
        raise APIError(501, f"the block manager client has no {name!r}", "not_implemented", None,
                       "unsupported_by_blockmgr")
    try:
        return await gw.bm_call(fn, *args)
    except BlockManagerRequestError as exc:
        code = getattr(exc, "code", None)
        if "unknown op" in str(exc):
            raise APIError(501, f"the block manager does not support this: {exc}", "not_implemented", None,
                           "unsupported_by_blockmgr") from None
        status, kind = _STATUS.get(code, (409, "invalid_request_error"))
        raise APIError(status, str(exc), kind, None, code or "blockmgr_refused") from None


def _token_ids(request: Request, spec: PromptSpec) -> list[int]:
    tokenizer = get_gateway(request).tokenizer
    if spec.messages is not None:
        return chat_prompt(tokenizer, spec.messages, spec.add_generation_prompt).token_ids
    if isinstance(spec.prompt, list) and not spec.prompt:
        raise bad_request("prompt must not be empty", "prompt")
    return completion_prompts(tokenizer, spec.prompt)[0].token_ids


@router.post("/cache/lookup", response_model=LookupResult, responses=_ERRORS,
             summary="How much of a prompt each executor has cached, and in which tier")
async def cache_lookup(body: LookupRequest, request: Request):
    ids = _token_ids(request, body)
    return {"num_tokens": len(ids), "executors": await _call(request, "cache_lookup", ids, body.cache_salt)}


@router.get("/cache/prefixes", response_model=PrefixList, responses=_ERRORS,
            summary="Cached prefix chains, most hit first")
async def cache_prefixes(request: Request, executor_id: Optional[str] = Query(None, max_length=300),
                         offset: int = Query(0, ge=0, le=2**31 - 1), limit: int = Query(50, ge=1, le=1000),
                         max_tokens: int = Query(32, ge=0, le=1024, description="leading tokens shown per prefix")):
    listing = await _call(request, "cache_prefixes", executor_id, offset, limit, max_tokens)
    tok = get_gateway(request).tokenizer
    prefixes = [{**p, "text": tok.decode(p["first_token_ids"])} for p in listing["prefixes"]]
    return {"total": listing["total"], "offset": offset, "limit": limit, "prefixes": prefixes}


@router.post("/cache/pin", response_model=PinList, responses={**_ERRORS, **errors(404, 409)},
             summary="Keep a cached prefix out of eviction (until unpinned or its TTL runs out)")
async def cache_pin(body: PinRequest, request: Request):
    ids = None if body.prefix_id is not None else _token_ids(request, body)
    return {"pins": await _call(request, "pin", ids, body.cache_salt, body.prefix_id, body.executor_id, body.ttl_s)}


@router.get("/cache/pins", response_model=PinList, responses=_ERRORS, summary="Every pin")
async def cache_pins(request: Request):
    return {"pins": await _call(request, "pins")}


@router.delete("/cache/pin/{pin_id}", response_model=Unpinned, responses={**_ERRORS, **errors(404)},
               summary="Unpin")
async def cache_unpin(pin_id: str, request: Request):
    return await _call(request, "unpin", pin_id)


@router.get("/cache/blocks", response_model=BlockMaps, responses=_ERRORS, summary="Each executor's block map")
async def cache_blocks(request: Request):
    return {"executors": await _call(request, "block_map")}


@page_router.get("/admin/", response_class=HTMLResponse, summary="The live cache page (HTML)",
                 responses={200: {"content": {"text/html": {}}, "description": "the page"}})
async def cache_page():
    return HTMLResponse(_PAGE.read_text(encoding="utf-8"))
