"""Wire protocol between the gateway and an executor: msgpack maps over ZeroMQ DEALER/ROUTER.

Gateway -> executor:

- ``{"op": "generate", "request_id", "prompt_token_ids": [int], "params": {SamplingParams fields},
  "priority": int, "cache_salt": str|None}``: ``params`` holds any fields of
  :class:`executor.request.SamplingParams` (unknown ones are refused); ``priority`` (default 0):
  lower values are scheduled first, ties first come first served; ``cache_salt``: prefix-cache
  blocks are shared only between requests with the same salt; ``output_token_ids`` (optional,
  ``n == 1`` only): tokens the request already generated on an executor that died, so it resumes
  here by recompute and continues exactly (see :meth:`executor.engine.Engine.add_request`).
- ``{"op": "abort", "request_id"}``
- ``{"op": "info", "nonce"}``, ``{"op": "ping", "nonce"}`` and ``{"op": "sequences", "nonce"}``:
  answered with the same nonce.

Executor -> gateway:

- ``{"op": "output", "request_id", "index": int, "token_ids": [int], "finished": bool,
  "finish_reason": str|None, "error": str|None, "num_prompt_tokens": int,
  "num_cached_tokens": int, "logprobs": [entry]|None, "prompt_logprobs": [None, entry, ...]|None}``.
  ``index`` says which of the request's ``n`` completions it belongs to. A request the executor
  refuses (bad parameters) gets one output with ``finish_reason == "error"`` and the reason in
  ``error``.

  ``logprobs`` is present when the request set ``params.logprobs``: one entry per item of
  ``token_ids``, ``{"token_id": int, "logprob": float, "top": [[token_id, logprob], ...]}`` with
  ``top`` the ``params.logprobs`` most likely tokens, best first (it may include ``token_id``).
  ``prompt_logprobs`` is on the first output of a request that set ``params.prompt_logprobs``: one
  item per prompt token, None for the first (nothing predicts it), then entries of the same shape
  (``top`` with ``params.prompt_logprobs`` tokens). Both are natural-log probabilities of the
  model's raw next-token distribution, before penalties, temperature and top-k/top-p/min-p
  filtering (vLLM's default); see :mod:`executor.sampler`.
- ``{"op": "reply", "nonce", ...fields}``.
"""

from __future__ import annotations

from typing import Any

import msgpack


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(frame: bytes) -> dict[str, Any]:
    """Raises ValueError for a frame that is not a msgpack map."""
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ValueError(f"undecodable frame: {exc}") from None
    if not isinstance(message, dict):
        raise ValueError(f"expected a map, got {type(message).__name__}")
    return message
