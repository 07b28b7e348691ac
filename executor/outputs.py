"""What the engine reports: one :class:`RequestOutput` per request per step, and :class:`StepRecord`."""

from __future__ import annotations

from dataclasses import dataclass, field

from executor.request import Request, Status


@dataclass
class RequestOutput:
    """What one step produced for one request (sent to the gateway).

    Attributes:
        logprobs: when the request set ``logprobs``, one entry per ``new_token_ids`` item:
            ``{"token_id", "logprob", "top": [[token_id, logprob], ...]}`` (see
            :mod:`executor.sampler`); else None.
        prompt_logprobs: on a request's first output only, when it set ``prompt_logprobs``: one
            item per prompt token, ``None`` for the first, then entries of the same shape.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    index: int = 0  # which of the request's n completions
    logprobs: list[dict] | None = None
    prompt_logprobs: list | None = None


@dataclass
class StepRecord:
    """What a step did, for tests and benchmarks: who ran and how many tokens each computed."""

    step: int
    scheduled: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0


def output_of(req: Request, tokens: list[int], logprobs: list[dict] | None = None) -> RequestOutput:
    """The :class:`RequestOutput` of ``req`` carrying ``tokens`` (and their ``logprobs`` entries).

    An n > 1 completion reports under its request's id with its own ``index``. The prompt
    log-probabilities ride on the request's first output that carries tokens, and only on it.
    """
    prompt_logprobs = None
    if tokens and req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
        req.prompt_logprobs_sent = True
        prompt_logprobs = req.prompt_logprobs
    return RequestOutput(req.parent_id or req.request_id, tokens, req.status is Status.FINISHED, req.finish_reason,
                         req.error, len(req.prompt_token_ids), req.num_cached_tokens, req.index, logprobs,
                         prompt_logprobs)
