"""GET /health, GET /version, GET /v1/models[/{model}], POST /tokenize, POST /detokenize."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from executor.client import ExecutorUnavailable
from gateway.auth import require_api_key
from gateway.errors import APIError, bad_request
from gateway.openai_protocol import (DetokenizeRequest, DetokenizeResponse, HealthResponse, ModelCard, ModelList,
                                     TokenizeRequest, TokenizeResponse, VersionResponse)
from gateway.routes.common import errors
from gateway.runtime import get_gateway
from gateway.tokenization import chat_prompt, vocab_size

router = APIRouter()


@router.get("/health", response_model=HealthResponse, tags=["server"],
            responses={503: {"model": HealthResponse, "description": "the block manager or every executor is down"}},
            summary="200 when the block manager and at least one executor answer")
async def health(request: Request):
    gw = get_gateway(request)
    problems: list[str] = []

    async def ping_blockmgr() -> bool:
        try:
            await gw.bm_call(gw.blockmgr.ping)
            return True
        except APIError as exc:
            problems.append(exc.message)
        except Exception as exc:  # a refusal: it answers, but not as expected
            problems.append(f"block manager: {exc}")
        return False

    async def ping(h) -> bool:
        try:
            await h.client.request("ping", timeout_s=1.0)
            return True
        except ExecutorUnavailable as exc:
            problems.append(str(exc))
            return False

    results = await asyncio.gather(ping_blockmgr(), *(ping(h) for h in gw.pool.handles))
    alive = sum(1 for r in results[1:] if r)
    if alive == 0 or not results[0]:
        return JSONResponse({"status": "unhealthy", "executors": alive, "problems": problems}, status_code=503)
    body = {"status": "ok", "executors": alive}
    if problems:
        body["problems"] = problems
    return body


@router.get("/version", response_model=VersionResponse, tags=["server"])
async def version(request: Request):
    return {"version": get_gateway(request).settings.version}


def _model_card(gw) -> dict:
    return {"id": gw.settings.served_model_name, "object": "model", "created": 0, "owned_by": "pagedserve",
            "root": gw.settings.model, "max_model_len": gw.settings.max_model_len}


@router.get("/v1/models", response_model=ModelList, tags=["models"], dependencies=[Depends(require_api_key)],
            responses=errors(401))
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(get_gateway(request))]}


@router.get("/v1/models/{model}", response_model=ModelCard, tags=["models"], dependencies=[Depends(require_api_key)],
            responses=errors(401, 404))
async def retrieve_model(model: str, request: Request):
    gw = get_gateway(request)
    if model != gw.settings.served_model_name:
        raise APIError(404, f"The model `{model}` does not exist", "not_found_error", "model", "model_not_found")
    return _model_card(gw)


@router.post("/tokenize", response_model=TokenizeResponse, tags=["tokenizer"],
             dependencies=[Depends(require_api_key)], responses=errors(400, 401, 404, 413))
async def tokenize(body: TokenizeRequest, request: Request):
    """Token ids of ``prompt``, or of ``messages`` formatted with the chat template."""
    gw = get_gateway(request)
    gw.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages must not be empty", "messages")
        ids = chat_prompt(gw.tokenizer, body.messages, body.add_generation_prompt).token_ids
    else:
        ids = gw.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    out = {"count": len(ids), "max_model_len": gw.settings.max_model_len, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = gw.tokenizer.convert_ids_to_tokens(ids)
    return out


@router.post("/detokenize", response_model=DetokenizeResponse, tags=["tokenizer"],
             dependencies=[Depends(require_api_key)], responses=errors(400, 401, 404, 413))
async def detokenize(body: DetokenizeRequest, request: Request):
    gw = get_gateway(request)
    gw.check_model(body.model)
    vocab = vocab_size(gw.tokenizer)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": gw.tokenizer.decode(body.tokens)}
