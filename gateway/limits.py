"""Bounds on what one request may ask for, and the body-size middleware.

Every limit is a :class:`gateway.settings.GatewaySettings` field, so a ``pagedserve`` flag (the
field's name with dashes) and a ``PAGEDSERVE_`` variable; :data:`DEFAULT_LIMITS` holds the defaults. A request over a limit gets
HTTP 400 with an OpenAI error body naming the field; a full waiting queue gets 429 with
``Retry-After`` (see :meth:`gateway.runtime.Gateway.check_capacity`).

- ``max_sequences_per_request``: prompts x n (or x the beam width with beam search) in one request;
  OpenAI allows n up to 128, and a batch of prompts multiplies it.
- ``max_stop_strings`` (OpenAI's limit is 4) and ``max_stop_string_chars`` per stop string.
- ``max_abs_priority``: ``priority`` must lie in [-max, max].
- ``min_temperature``: a temperature in (0, min_temperature) is treated as greedy (0): dividing
  logits by 1e-300 overflows to inf and the softmax to NaN.
- ``max_logit_bias_entries``: entries of ``logit_bias``.
- ``max_waiting_sequences``: the gateway's waiting queue, in sequences.

The prompt and ``max_tokens`` are checked against the context length before anything runs
(:func:`check_context`), and again against the chosen executor (``gateway.sampling.check_fits``).
"""

from __future__ import annotations

import json

from gateway.errors import bad_request
from gateway.settings import GatewaySettings

LIMITS = ("max_sequences_per_request", "max_waiting_sequences", "max_stop_strings", "max_stop_string_chars",
          "max_abs_priority", "min_temperature", "max_logit_bias_entries")
DEFAULT_LIMITS: dict = {name: GatewaySettings.model_fields[name].default for name in LIMITS}


def check_sequences(settings, num_prompts: int, n: int, width: int | None = None) -> int:
    """The sequences a request asks for (``num_prompts x max(n, width)``), checked.

    Raises:
        APIError(400, code ``too_many_sequences``): over ``settings.max_sequences_per_request``.
    """
    total = num_prompts * max(n, width or 0)
    if total > settings.max_sequences_per_request:
        raise bad_request(f"the request asks for {total} sequences ({num_prompts} prompt(s) x n={n}"
                          f"{f' x {width} beams' if width else ''}); at most {settings.max_sequences_per_request} "
                          f"are allowed per request", "n", "too_many_sequences")
    return total


def check_stops(settings, stops: list[str]) -> list[str]:
    """``stops`` if within ``max_stop_strings`` and ``max_stop_string_chars``; else APIError(400)."""
    if len(stops) > settings.max_stop_strings:
        raise bad_request(f"stop: at most {settings.max_stop_strings} stop strings, got {len(stops)}", "stop")
    longest = max((len(s) for s in stops), default=0)
    if longest > settings.max_stop_string_chars:
        raise bad_request(f"stop: a stop string may have at most {settings.max_stop_string_chars} characters, "
                          f"got {longest}", "stop")
    return stops


def check_priority(settings, priority: int) -> int:
    """``priority`` if within [-max_abs_priority, max_abs_priority]; else APIError(400)."""
    if abs(priority) > settings.max_abs_priority:
        raise bad_request(f"priority must be in [-{settings.max_abs_priority}, {settings.max_abs_priority}], "
                          f"got {priority}", "priority")
    return priority


def effective_temperature(settings, temperature: float) -> float:
    """0.0 (greedy) for a temperature below ``min_temperature``, else the temperature."""
    return 0.0 if temperature < settings.min_temperature else temperature


def logit_bias_pairs(settings, logit_bias: dict[str, float] | None, vocab_size: int) -> list[list]:
    """OpenAI's ``logit_bias`` map (token id as a string -> bias in [-100, 100]) as ``[[id, bias], ...]``
    sorted by id, for the executor.

    Raises:
        APIError(400): too many entries, or a key that is not a token id in [0, vocab_size).
    """
    if not logit_bias:
        return []
    if len(logit_bias) > settings.max_logit_bias_entries:
        raise bad_request(f"logit_bias: at most {settings.max_logit_bias_entries} entries, got {len(logit_bias)}",
                          "logit_bias")
    pairs = {}
    for key, bias in logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size or not key.strip().isdigit():
            raise bad_request(f"logit_bias: {key[:40]!r} is not a token id in [0, {vocab_size})", "logit_bias")
        pairs[token] = float(bias)
    return [[t, pairs[t]] for t in sorted(pairs)]


def check_context(settings, num_prompt_tokens: int, max_tokens: int | None, param: str = "prompt",
                  limit: int | None = None) -> None:
    """Refuse a prompt (plus ``max_tokens`` when given) over the context length: ``limit``, by
    default ``settings.max_model_len`` (checked before routing; ``gateway.sampling.check_fits``
    checks again with the chosen executor's own limit).

    Raises:
        APIError(400, code ``context_length_exceeded``), naming ``param`` when the prompt alone is
        too long, else ``max_tokens``.
    """
    limit = settings.max_model_len if limit is None else limit
    total = num_prompt_tokens + (max_tokens or 0)
    if total > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                          f"{total} tokens ({num_prompt_tokens} in the prompt, {max_tokens or 0} in the completion). "
                          f"Please reduce the prompt or max_tokens.",
                          param if num_prompt_tokens > limit else "max_tokens", "context_length_exceeded")


class BodySizeLimit:
    """Buffers each request body up to ``max_bytes`` and answers 413 beyond it.

    Both a ``Content-Length`` over the limit and a chunked body that grows past it are refused.
    The app then receives the body in one message (bodies are small: prompts and parameters).
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send, size: str) -> None:
        body = json.dumps({"error": {
            "message": f"the request body ({size}) is over the limit of {self.max_bytes} bytes",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length > self.max_bytes:
                    return await self._too_large(send, f"{length} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending the body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send, f"more than {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
