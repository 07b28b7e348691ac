"""What the route modules share: OpenAPI error documentation, the generation routes' common
checks, and small helpers."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request

from gateway.auth import cache_salt_for
from gateway.limits import check_priority, check_sequences, logit_bias_pairs
from gateway.openai_protocol import ErrorResponse, SamplingFields
from gateway.runtime import Gateway, get_gateway
from gateway.sampling import beam_width, growth_width, stop_strings

_ERROR_TEXT = {
    400: "invalid parameters (OpenAI error body)",
    401: "missing or wrong API key / admin key",
    403: "admin endpoint asked from a non-loopback client without --admin-key",
    404: "not found (on the model endpoints: an unknown `model`, code model_not_found)",
    409: "the action could not be carried out now",
    413: "request body over the size limit",
    501: "not supported by the block manager in use",
    503: "overloaded (waiting queue full) or no executor / block manager answers; see Retry-After",
    504: "the request did not finish within its deadline (--request-timeout / request_timeout)",
}


def errors(*codes: int) -> dict:
    """OpenAPI ``responses`` entries for error statuses, all with the OpenAI error body."""
    return {c: {"model": ErrorResponse, "description": _ERROR_TEXT[c]} for c in codes}


def stream_doc(model) -> dict:
    """The 200 entry of an endpoint that answers JSON, or SSE when ``stream`` is true."""
    return {200: {"model": model, "description": "the result; with `stream: true`, `text/event-stream` events "
                                                 "of chunks, ending with `data: [DONE]`",
                  # Before OpenAPI 3.2 the schema of an event stream describes each event: a `data`
                  # line holding one JSON chunk, an error object, or the final `[DONE]`.
                  "content": {"text/event-stream": {"schema": {
                      "type": "object", "required": ["data"],
                      "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE]"}}}}}}}


def now_s() -> int:
    return int(time.time())


@dataclass
class Generation:
    """What a generation route (completions, chat) knows of a request once its common checks passed.

    Attributes:
        gw: the gateway.
        arrival: ``time.monotonic()`` when the route started (for TTFT and the request's deadline).
        width: the beam width to send (None: the executor's default, or no beam search).
        growth: how many of each prompt's sequences grow at once (beams, else ``n``).
        stops: the non-empty stop strings.
        bias: ``logit_bias`` as the executor's ``[[token_id, bias], ...]``.
        salt: the prefix-cache salt sent to the executor (see :func:`gateway.auth.cache_salt_for`).
    """

    gw: Gateway
    arrival: float
    width: int | None
    growth: int
    stops: list[str]
    bias: list
    salt: str | None


def start_generation(request: Request, body: SamplingFields, num_prompts: int,
                     best_of: int | None = None) -> Generation:
    """The checks both generation routes make before tokenizing, in one order: the model name, the
    number of sequences (``num_prompts`` x ``max(n, beam width)``), stop strings, priority and
    ``logit_bias``.

    Raises:
        gateway.errors.APIError: 400 (OpenAI error body) naming the first field that fails.
    """
    gw = get_gateway(request)
    arrival = time.monotonic()
    gw.check_model(body.model)
    settings = gw.settings
    width = beam_width(body, body.n, best_of)
    growth = growth_width(body, body.n, width)
    check_sequences(settings, num_prompts, body.n, growth)
    stops = stop_strings(body, settings)
    check_priority(settings, body.priority)
    bias = logit_bias_pairs(settings, body.logit_bias, len(gw.tokenizer))
    return Generation(gw, arrival, width, growth, stops, bias, cache_salt_for(request, body.cache_salt))
