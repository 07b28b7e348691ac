"""POST /v1/completions: prompts (string, strings, token ids, lists of token ids), streamed or not.

``echo`` prepends the prompt's text to each choice (and, with ``logprobs``, the prompt tokens'
logprobs; the first prompt token's is None). ``echo`` with ``max_tokens: 0`` returns the prompt
alone, as lm-evaluation-harness's loglikelihood requests expect: without ``logprobs`` the gateway
answers from the tokenizer; with ``logprobs`` it asks the executor for prompt logprobs with
``max_tokens: 1`` (the executor must generate at least one token) and drops that token, so
``completion_tokens`` is 0 and ``finish_reason`` is ``length``.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from gateway.auth import cache_salt_for, require_api_key
from gateway.errors import bad_request
from gateway.generation import Job, close_runs, merged_deltas, start_runs, usage
from gateway.limits import check_context, check_priority, check_sequences, logit_bias_pairs
from gateway.logprobs import completion_logprobs, merge_completion_logprobs, prompt_entries
from gateway.openai_protocol import Completion, CompletionRequest
from gateway.routes.common import errors, now_s, stream_doc
from gateway.runtime import get_gateway
from gateway.sampling import beam_width, executor_params, growth_width, stop_strings
from gateway.streaming import event_stream, sse, until_disconnect
from gateway.tokenization import completion_prompts

router = APIRouter(tags=["completions"])


def _lp_len(lp: dict | None) -> int:
    return len("".join(lp["tokens"])) if lp else 0


@router.post("/v1/completions", dependencies=[Depends(require_api_key)], response_model=None,
             responses={**stream_doc(Completion), **errors(400, 401, 413, 503)},
             summary="Create a completion (OpenAI API, with vLLM's extra sampling fields)")
async def create_completion(body: CompletionRequest, request: Request):
    gw = get_gateway(request)
    arrival = time.monotonic()
    gw.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    settings = gw.settings
    n = body.n
    width = beam_width(body, n, body.best_of)
    # Bounded before any tokenization: the number of prompts is known from the body's shape.
    batch = isinstance(body.prompt, list) and bool(body.prompt) and not isinstance(body.prompt[0], int)
    check_sequences(settings, len(body.prompt) if batch else 1, n, growth_width(body, n, width))
    stops = stop_strings(body, settings)
    check_priority(settings, body.priority)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
    bias = logit_bias_pairs(settings, body.logit_bias, len(gw.tokenizer))
    salt = cache_salt_for(request, body.cache_salt)
    prompts = completion_prompts(gw.tokenizer, body.prompt)
    for p in prompts:
        check_context(settings, len(p.token_ids), max_tokens)
    echo_only = max_tokens == 0
    k = body.logprobs
    tt = gw.token_text

    # Per prompt: the echoed text and (with logprobs) its logprobs object, filled once known.
    echo_text = [p.text if body.echo else "" for p in prompts]

    if echo_only:
        # One executor token per prompt (for prompt logprobs), or none at all without logprobs.
        jobs = [Job(p.token_ids, executor_params(body, 1, 1, None, k, None, settings, bias), 1, [], body.priority,
                    salt, drop_output=True, choice_offset=i, min_tokens=body.min_tokens)
                for i, p in enumerate(prompts)] if k is not None else []
    else:
        jobs = [Job(p.token_ids, executor_params(body, max_tokens, n, k, k if (body.echo and k is not None) else None,
                                                 width, settings, bias),
                    n, stops, body.priority, salt, choice_offset=i * n, width=growth_width(body, n, width),
                    min_tokens=body.min_tokens)
                for i, p in enumerate(prompts)]

    if jobs:
        response_id, runs = await until_disconnect(request, start_runs(gw, jobs, "cmpl", arrival))
    else:
        from uuid import uuid4

        response_id, runs = f"cmpl-{uuid4().hex}", []
        for p in prompts:
            if len(p.token_ids) > gw.settings.max_model_len:
                raise bad_request(f"the prompt ({len(p.token_ids)} tokens) is longer than the model's context "
                                  f"length {gw.settings.max_model_len}", "prompt", "context_length_exceeded")
    per_prompt = 1 if echo_only else n  # echo-only: every choice of a prompt is the prompt itself

    def echo_logprobs(i: int) -> dict | None:
        if k is None or not body.echo:
            return None
        run = runs[i]
        return completion_logprobs(tt, prompts[i].token_ids, prompt_entries(prompts[i].token_ids, run.prompt_logprobs),
                                   k, 0)

    def usage_obj() -> dict:
        if runs:
            u = usage(runs)
        else:
            prompt = sum(len(p.token_ids) for p in prompts)
            u = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        return u

    base = {"id": response_id, "object": "text_completion", "created": now_s(), "model": gw.settings.served_model_name}
    num_choices = len(prompts) * n

    def prompt_of(index: int) -> int:
        return index // n

    if not body.stream:
        texts = {i: [] for i in range(len(prompts) * per_prompt)}
        lps = {i: [] for i in texts}
        offsets = {i: 0 for i in texts}
        finish: dict[int, str | None] = {i: ("length" if echo_only else None) for i in texts}

        async def collect():
            gen = merged_deltas(runs) if runs else None
            if gen is None:
                return
            try:
                async for d in gen:
                    texts[d.index].append(d.text)
                    if k is not None and d.token_ids:
                        p = d.index // per_prompt
                        lp = completion_logprobs(tt, d.token_ids, d.logprobs, k, len(echo_text[p]) + offsets[d.index])
                        offsets[d.index] += _lp_len(lp)
                        lps[d.index].append(lp)
                    if d.finish_reason:
                        finish[d.index] = d.finish_reason
            finally:
                await gen.aclose()

        await until_disconnect(request, collect())
        choices = []
        for index in range(num_choices):
            src = index if not echo_only else prompt_of(index)
            p = src // per_prompt
            lp = merge_completion_logprobs([echo_logprobs(p) if body.echo else None, *lps[src]]) if k is not None else None
            choices.append({"index": index, "text": echo_text[p] + "".join(texts[src]), "logprobs": lp,
                            "finish_reason": finish[src] or "stop"})
        return {**base, "choices": choices, "usage": usage_obj()}

    include_usage = body.include_usage

    async def events():
        extra = {"usage": None} if include_usage else {}
        offsets: dict[int, int] = {}
        if body.echo:
            for index in range(num_choices):
                p = prompt_of(index)
                lp = echo_logprobs(p)
                offsets[index] = len(echo_text[p])
                if echo_only:
                    yield sse({**base, "choices": [{"index": index, "text": echo_text[p], "logprobs": lp,
                                                    "finish_reason": "length"}], **extra})
                else:
                    yield sse({**base, "choices": [{"index": index, "text": echo_text[p], "logprobs": lp,
                                                    "finish_reason": None}], **extra})
        if runs and not echo_only:
            gen = merged_deltas(runs)
            try:
                async for d in gen:
                    lp = None
                    if k is not None:
                        lp = completion_logprobs(tt, d.token_ids, d.logprobs, k, offsets.get(d.index, 0))
                        offsets[d.index] = offsets.get(d.index, 0) + _lp_len(lp)
                    yield sse({**base, "choices": [{"index": d.index, "text": d.text, "logprobs": lp,
                                                    "finish_reason": d.finish_reason}], **extra})
            finally:
                await gen.aclose()
        else:
            for r in runs:  # echo-only: the prompt logprobs came with the first output
                await r.aclose()
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage_obj()})

    return event_stream(events(), response_id, cleanup=lambda: close_runs(runs))
