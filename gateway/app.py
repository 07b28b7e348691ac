"""The FastAPI app: OpenAI-compatible completions and chat, health, models, cache inspection."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoTokenizer

from blockmgr.client import BlockManagerClient, BlockManagerRequestError, BlockManagerUnavailable
from executor.client import ExecutorClient, ExecutorUnavailable
from gateway.detokenizer import TextStream
from gateway.errors import APIError, bad_request, install_handlers
from gateway.openai_protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("pagedserve.gateway")


@dataclass
class GatewaySettings:
    """Where the gateway finds its model files and the other processes.

    Attributes:
        model_dir: HF-layout directory with the tokenizer files and config.json.
        served_model_name: the name clients pass as ``model``.
        executors: ZeroMQ addresses of the executors.
        blockmgr: ZeroMQ address of the block manager.
        max_model_len: longest prompt + output accepted.
    """

    model_dir: str
    served_model_name: str
    executors: list[str]
    blockmgr: str
    max_model_len: int
    pool_blocks: dict[str, int] = field(default_factory=dict)


class Gateway:
    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
        self.executors = [ExecutorClient(a) for a in settings.executors]
        self.blockmgr = BlockManagerClient(settings.blockmgr, timeout_s=2.0)
        self.info: dict[str, dict] = {}

    async def start(self) -> None:
        for ex in self.executors:
            await ex.start()

    async def close(self) -> None:
        for ex in self.executors:
            await ex.close()
        self.blockmgr.close()

    async def executor_info(self, ex: ExecutorClient) -> dict:
        info = await ex.request("info")
        self.info[ex.address] = info
        return info

    async def pick_executor(self) -> tuple[ExecutorClient, dict]:
        """The least loaded executor that answers; its pool geometry with it."""
        for ex in sorted(self.executors, key=lambda e: e.num_active):
            try:
                info = self.info.get(ex.address) or await self.executor_info(ex)
                return ex, info
            except ExecutorUnavailable:
                continue
        raise APIError(503, "no executor is available", "service_unavailable", code="no_executor",
                       headers={"Retry-After": "1"})

    async def blockmgr_call(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except BlockManagerUnavailable as exc:
            raise APIError(503, str(exc), "service_unavailable", code="blockmgr_unavailable",
                           headers={"Retry-After": "1"}) from None


def _check_model(gw: Gateway, model: str | None) -> None:
    if model is not None and model != gw.settings.served_model_name:
        raise APIError(400, f"The model `{model}` does not exist; this server serves "
                       f"`{gw.settings.served_model_name}`.", "invalid_request_error", "model", "model_not_found")


def _check_fits(info: dict, num_prompt: int, max_tokens: int, max_model_len: int) -> None:
    total = num_prompt + max_tokens
    if total > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{total} tokens ({num_prompt} in the messages, {max_tokens} in the completion).",
            "max_tokens", "context_length_exceeded",
        )
    blocks = -(-total // info["block_size"])
    if blocks > info["num_blocks"]:
        raise bad_request(
            f"The request needs {blocks} KV blocks but the executor's pool has only {info['num_blocks']}.",
            "max_tokens", "kv_cache_too_small",
        )


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


def create_app(settings: GatewaySettings) -> FastAPI:
    gw = Gateway(settings)

    @asynccontextmanager
    async def lifespan(_app):
        await gw.start()
        yield
        await gw.close()

    app = FastAPI(title="pagedserve", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gw
    install_handlers(app)

    @app.get("/health")
    async def health():
        problems = []
        try:
            await gw.blockmgr_call(gw.blockmgr.ping)
        except APIError as exc:
            problems.append(exc.message)
        alive = 0
        for ex in gw.executors:
            try:
                await ex.request("ping", timeout_s=1.0)
                alive += 1
            except ExecutorUnavailable as exc:
                problems.append(str(exc))
        if problems or alive == 0:
            return JSONResponse({"status": "unhealthy", "problems": problems}, status_code=503)
        return {"status": "ok", "executors": alive}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "pagedserve",
            "max_model_len": settings.max_model_len,
        }]}

    @app.get("/admin/cache")
    async def admin_cache(request: Request):
        if not _is_loopback(request):
            raise APIError(403, "admin endpoints answer only loopback clients", "permission_error")
        return await gw.blockmgr_call(gw.blockmgr.stats)

    async def run(prompt_ids: list[int], body, max_tokens: int, kind: str):
        ex, info = await gw.pick_executor()
        _check_fits(info, len(prompt_ids), max_tokens, settings.max_model_len)
        params = {
            "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "seed": body.seed, "stop_token_ids": body.stop_token_ids,
            "ignore_eos": body.ignore_eos,
        }
        request_id = f"{kind}-{uuid.uuid4().hex}"
        return request_id, ex.generate(request_id, prompt_ids, params)

    async def collect(stream_gen, text: TextStream):
        """Consume a request's outputs; yields (delta_text, finish_reason or None, num_completion_tokens)."""
        n_tokens = 0
        try:
            async for msg in stream_gen:
                if msg["finish_reason"] == "error":
                    raise bad_request(msg.get("error") or "the executor refused the request")
                n_tokens += len(msg["token_ids"])
                delta = text.push(msg["token_ids"])
                if text.stopped:
                    yield delta, "stop", n_tokens
                    return
                if msg["finished"]:
                    yield delta + text.finish(), msg["finish_reason"], n_tokens
                    return
                if delta:
                    yield delta, None, n_tokens
        finally:
            await stream_gen.aclose()

    def usage(n_prompt: int, n_completion: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                "total_tokens": n_prompt + n_completion}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        _check_model(gw, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt_text = gw.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises for conversations the template rejects
            raise bad_request(f"messages could not be formatted with the model's chat template: {exc}", "messages")
        prompt_ids = gw.tokenizer.encode(prompt_text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_model_len - len(prompt_ids)
        if max_tokens < 1:
            raise bad_request(f"the messages fill the whole context length ({settings.max_model_len} tokens)",
                              "messages", "context_length_exceeded")
        request_id, gen = await run(prompt_ids, body, max_tokens, "chatcmpl")
        text = TextStream(gw.tokenizer, body.stop_list())
        created = int(time.time())
        base = {"id": request_id, "created": created, "model": settings.served_model_name}

        if not body.stream:
            parts, finish, n_out = [], None, 0
            async for delta, finish, n_out in collect(gen, text):
                parts.append(delta)
            return {**base, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                "logprobs": None, "finish_reason": finish}], "usage": usage(len(prompt_ids), n_out)}

        async def events():
            chunk = {**base, "object": "chat.completion.chunk"}
            yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
            n_out = 0
            try:
                async for delta, finish, n_out in collect(gen, text):
                    yield sse({**chunk, "choices": [{"index": 0, "delta": {"content": delta} if delta else {},
                                                     "logprobs": None, "finish_reason": finish}]})
            except APIError as exc:
                yield sse(exc.body())
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**chunk, "choices": [], "usage": usage(len(prompt_ids), n_out)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _check_model(gw, body.model)
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise bad_request("prompt must not be empty", "prompt")
            prompt_ids = gw.tokenizer.encode(body.prompt)
        else:
            prompt_ids = list(body.prompt)
            vocab = len(gw.tokenizer)
            if not prompt_ids or any(not 0 <= t < vocab for t in prompt_ids):
                raise bad_request(f"prompt token ids must be a non-empty list of ids in [0, {vocab})", "prompt")
        if body.max_tokens == 0:
            raise bad_request("max_tokens must be at least 1", "max_tokens")
        request_id, gen = await run(prompt_ids, body, body.max_tokens, "cmpl")
        text = TextStream(gw.tokenizer, body.stop_list())
        base = {"id": request_id, "created": int(time.time()), "model": settings.served_model_name}

        if not body.stream:
            parts, finish, n_out = [], None, 0
            async for delta, finish, n_out in collect(gen, text):
                parts.append(delta)
            return {**base, "object": "text_completion", "choices": [{
                "index": 0, "text": "".join(parts), "logprobs": None, "finish_reason": finish}],
                "usage": usage(len(prompt_ids), n_out)}

        async def events():
            chunk = {**base, "object": "text_completion"}
            n_out = 0
            try:
                async for delta, finish, n_out in collect(gen, text):
                    yield sse({**chunk, "choices": [{"index": 0, "text": delta, "logprobs": None,
                                                     "finish_reason": finish}]})
            except APIError as exc:
                yield sse(exc.body())
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**chunk, "choices": [], "usage": usage(len(prompt_ids), n_out)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
