"""POST /v1/chat/completions: messages through the model's chat template, streamed or not.

Without ``max_completion_tokens`` / ``max_tokens`` a reply may use all the room left: the
context length minus the prompt, or what the executor's KV pool can hold, whichever is less.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from gateway.auth import require_api_key
from gateway.errors import bad_request
from gateway.generation import Job, close_runs, merged_deltas, start_runs, usage
from gateway.limits import check_context
from gateway.logprobs import chat_logprobs
from gateway.openai_protocol import ChatCompletion, ChatCompletionRequest
from gateway.routes.common import errors, now_s, start_generation, stream_doc
from gateway.sampling import executor_params
from gateway.streaming import event_stream, sse, until_disconnect
from gateway.tokenization import chat_prompt

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)], response_model=None,
             responses={**stream_doc(ChatCompletion), **errors(400, 401, 404, 413, 503, 504)},
             summary="Create a chat completion (OpenAI API, with vLLM's extra sampling fields)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    g = start_generation(request, body, num_prompts=1)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    gw, settings, n = g.gw, g.gw.settings, body.n
    prompt = chat_prompt(gw.tokenizer, body.messages, body.add_generation_prompt)
    k = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens  # None: as many as fit
    check_context(settings, len(prompt.token_ids), max_tokens, "messages")
    job = Job(prompt.token_ids, executor_params(body, max_tokens, n, k, None, g.width, settings, g.bias), n, g.stops,
              body.priority, g.salt, width=g.growth, min_tokens=body.min_tokens, timeout_s=body.request_timeout)
    response_id, runs = await until_disconnect(request, start_runs(gw, [job], "chatcmpl", g.arrival))
    tt = gw.token_text
    base = {"id": response_id, "created": now_s(), "model": gw.settings.served_model_name}

    if not body.stream:
        texts: dict[int, list[str]] = {i: [] for i in range(n)}
        entries: dict[int, list[dict]] = {i: [] for i in range(n)}
        finish: dict[int, str | None] = {i: None for i in range(n)}

        async def collect():
            gen = merged_deltas(runs)
            try:
                async for d in gen:
                    texts[d.index].append(d.text)
                    entries[d.index] += d.logprobs
                    if d.finish_reason:
                        finish[d.index] = d.finish_reason
            finally:
                await gen.aclose()

        await until_disconnect(request, collect())
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                    "logprobs": chat_logprobs(tt, entries[i], k) if k is not None else None,
                    "finish_reason": finish[i] or "stop"} for i in range(n)]
        return {**base, "object": "chat.completion", "choices": choices, "usage": usage(runs)}

    include_usage = body.include_usage
    chunk = {**base, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    async def events():
        for i in range(n):
            yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], **extra})
        gen = merged_deltas(runs)
        try:
            async for d in gen:
                delta = {"content": d.text} if d.text else {}
                lp = chat_logprobs(tt, d.logprobs, k) if k is not None and d.logprobs else None
                yield sse({**chunk, "choices": [{"index": d.index, "delta": delta, "logprobs": lp,
                                                 "finish_reason": d.finish_reason}], **extra})
        finally:
            await gen.aclose()
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(runs)})

    return event_stream(events(), response_id, cleanup=lambda: close_runs(runs))
