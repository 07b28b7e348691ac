"""What the route modules share: OpenAPI error documentation and small helpers."""

from __future__ import annotations

import time

from gateway.openai_protocol import ErrorResponse

_ERROR_TEXT = {
    400: "invalid parameters (OpenAI error body)",
    401: "missing or wrong API key / admin key",
    403: "admin endpoint asked from a non-loopback client without --admin-key",
    404: "not found",
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
