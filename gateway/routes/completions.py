"""POST /v1/completions: prompts (string, strings, token ids, lists of token ids), streamed or not.

``echo`` prepends the prompt's text to each choice (and, with ``logprobs``, the prompt tokens'
logprobs; the first prompt token's is None). ``echo`` with ``max_tokens: 0`` returns the prompt
alone, as lm-evaluation-harness's loglikelihood requests expect: without ``logprobs`` the gateway
answers from the tokenizer; with ``logprobs`` it asks the executor for prompt logprobs with
``max_tokens: 1`` (the executor must generate at least one token) and drops that token, so
``completion_tokens`` is 0 and ``finish_reason`` is ``length``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request

from gateway.auth import require_api_key
from gateway.errors import bad_request
from gateway.generation import Job, Run, close_runs, merged_deltas, start_runs, usage
from gateway.limits import check_context
from gateway.logprobs import completion_logprobs, merge_completion_logprobs, prompt_entries
from gateway.openai_protocol import ECHO_ONLY, Completion, CompletionRequest, at_least_one
from gateway.routes.common import Generation, errors, now_s, start_generation, stream_doc
from gateway.runtime import Gateway
from gateway.settings import GatewaySettings
from gateway.sampling import executor_params
from gateway.streaming import event_stream, sse, until_disconnect
from gateway.tokenization import Prompt, TokenText, completion_prompts

router = APIRouter(tags=["completions"])


def _lp_len(lp: dict | None) -> int:
    return len("".join(lp["tokens"])) if lp else 0


def _jobs(body: CompletionRequest, prompts: list[Prompt], max_tokens: int, g: Generation,
          settings: GatewaySettings) -> list[Job]:
    """One executor job per prompt; none for echo-only without logprobs (the tokenizer answers)."""
    n, k = body.n, body.logprobs
    if max_tokens == 0:
        # Echo only: one executor token per prompt, only to get the prompt logprobs.
        if k is None:
            return []
        return [Job(p.token_ids, executor_params(body, 1, 1, None, k, None, settings, g.bias), 1, [], body.priority,
                    g.salt, drop_output=True, choice_offset=i, min_tokens=body.min_tokens,
                    timeout_s=body.request_timeout)
                for i, p in enumerate(prompts)]
    prompt_k = k if (body.echo and k is not None) else None
    return [Job(p.token_ids, executor_params(body, max_tokens, n, k, prompt_k, g.width, settings, g.bias), n, g.stops,
                body.priority, g.salt, choice_offset=i * n, width=g.growth,
                min_tokens=body.min_tokens, timeout_s=body.request_timeout)
            for i, p in enumerate(prompts)]


@dataclass
class _Reply:
    """Turns the runs of one completions request into its JSON body or its SSE events.

    Choice ``index`` shows prompt ``index // n``. Echo-only requests (``max_tokens`` 0) have one
    source of output per prompt, which all ``n`` choices of that prompt repeat.
    """

    body: CompletionRequest
    prompts: list[Prompt]
    runs: list[Run]
    echo_only: bool
    tt: TokenText
    base: dict

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.body.n

    def source(self, index: int) -> int:
        """The delta index whose outputs choice ``index`` shows."""
        return index // self.body.n if self.echo_only else index

    def prompt_of_source(self, src: int) -> int:
        return src if self.echo_only else src // self.body.n

    def echo_text(self, p: int) -> str:
        return self.prompts[p].text if self.body.echo else ""

    def echo_logprobs(self, p: int) -> dict | None:
        if self.body.logprobs is None or not self.body.echo:
            return None
        ids = self.prompts[p].token_ids
        return completion_logprobs(self.tt, ids, prompt_entries(ids, self.runs[p].prompt_logprobs),
                                   self.body.logprobs, 0)

    def usage(self) -> dict:
        if self.runs:
            return usage(self.runs)
        prompt = sum(len(p.token_ids) for p in self.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt,
                "prompt_tokens_details": {"cached_tokens": 0}}

    async def collect(self) -> dict:
        """The non-streamed body."""
        k = self.body.logprobs
        sources = range(len(self.prompts) * (1 if self.echo_only else self.body.n))
        texts: dict[int, list[str]] = {s: [] for s in sources}
        lps: dict[int, list[dict | None]] = {s: [] for s in sources}
        offsets = {s: len(self.echo_text(self.prompt_of_source(s))) for s in sources}
        finish: dict[int, str | None] = {s: ("length" if self.echo_only else None) for s in sources}
        if self.runs:
            gen = merged_deltas(self.runs)
            try:
                async for d in gen:
                    texts[d.index].append(d.text)
                    if k is not None and d.token_ids:
                        lp = completion_logprobs(self.tt, d.token_ids, d.logprobs, k, offsets[d.index])
                        offsets[d.index] += _lp_len(lp)
                        lps[d.index].append(lp)
                    if d.finish_reason:
                        finish[d.index] = d.finish_reason
            finally:
                await gen.aclose()
        choices = []
        for index in range(self.num_choices):
            src = self.source(index)
            p = self.prompt_of_source(src)
            lp = merge_completion_logprobs([self.echo_logprobs(p), *lps[src]]) if k is not None else None
            choices.append({"index": index, "text": self.echo_text(p) + "".join(texts[src]), "logprobs": lp,
                            "finish_reason": finish[src] or "stop"})
        return {**self.base, "choices": choices, "usage": self.usage()}

    async def events(self):
        """The SSE events: the echoed prompts first, then the generated deltas, then usage."""
        k = self.body.logprobs
        extra = {"usage": None} if self.body.include_usage else {}
        offsets: dict[int, int] = {}
        if self.body.echo:
            for index in range(self.num_choices):
                p = index // self.body.n
                offsets[index] = len(self.echo_text(p))
                yield sse({**self.base, "choices": [{"index": index, "text": self.echo_text(p),
                                                     "logprobs": self.echo_logprobs(p),
                                                     "finish_reason": "length" if self.echo_only else None}],
                           **extra})
        if self.echo_only:
            for r in self.runs:  # the prompt logprobs came with the first output
                await r.aclose()
        elif self.runs:
            gen = merged_deltas(self.runs)
            try:
                async for d in gen:
                    lp = None
                    if k is not None:
                        lp = completion_logprobs(self.tt, d.token_ids, d.logprobs, k, offsets.get(d.index, 0))
                        offsets[d.index] = offsets.get(d.index, 0) + _lp_len(lp)
                    yield sse({**self.base, "choices": [{"index": d.index, "text": d.text, "logprobs": lp,
                                                         "finish_reason": d.finish_reason}], **extra})
            finally:
                await gen.aclose()
        if self.body.include_usage:
            yield sse({**self.base, "choices": [], "usage": self.usage()})


def _check_context(gw: Gateway, prompts: list[Prompt]) -> None:
    """Echo-only requests reach no executor: check the context length here."""
    for p in prompts:
        if len(p.token_ids) > gw.settings.max_model_len:
            raise bad_request(f"the prompt ({len(p.token_ids)} tokens) is longer than the model's context "
                              f"length {gw.settings.max_model_len}", "prompt", "context_length_exceeded")


@router.post("/v1/completions", dependencies=[Depends(require_api_key)], response_model=None,
             responses={**stream_doc(Completion), **errors(400, 401, 404, 413, 503, 504)},
             summary="Create a completion (OpenAI API, with vLLM's extra sampling fields)")
async def create_completion(body: CompletionRequest, request: Request):
    # The sequences are bounded before any tokenization: the number of prompts is known from the
    # body's shape.
    batch = isinstance(body.prompt, list) and bool(body.prompt) and not isinstance(body.prompt[0], int)
    g = start_generation(request, body, len(body.prompt) if batch else 1, body.best_of)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    gw, settings = g.gw, g.gw.settings
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise bad_request(at_least_one("max_tokens", 0, ECHO_ONLY), "max_tokens")
    prompts = completion_prompts(gw.tokenizer, body.prompt)
    for p in prompts:
        check_context(settings, len(p.token_ids), max_tokens)
    jobs = _jobs(body, prompts, max_tokens, g, settings)
    if jobs:
        response_id, runs = await until_disconnect(request, start_runs(gw, jobs, "cmpl", g.arrival))
    else:
        _check_context(gw, prompts)
        response_id, runs = f"cmpl-{uuid.uuid4().hex}", []
    reply = _Reply(body, prompts, runs, max_tokens == 0, gw.token_text,
                   {"id": response_id, "object": "text_completion", "created": now_s(),
                    "model": gw.settings.served_model_name})
    if not body.stream:
        return await until_disconnect(request, reply.collect())
    return event_stream(reply.events(), response_id, cleanup=lambda: close_runs(runs))
