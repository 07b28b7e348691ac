"""Wire protocol between the gateway and an executor: msgpack maps over ZeroMQ DEALER/ROUTER.

Gateway -> executor:

- ``{"op": "generate", "request_id", "prompt_token_ids": [int], "params": {SamplingParams fields}}``
- ``{"op": "abort", "request_id"}``
- ``{"op": "info", "nonce"}`` and ``{"op": "ping", "nonce"}``: answered with the same nonce.

Executor -> gateway:

- ``{"op": "output", "request_id", "token_ids": [int], "finished": bool, "finish_reason": str|None,
  "error": str|None, "num_prompt_tokens": int}``; a request the executor refuses (bad
  parameters) gets one output with ``finish_reason == "error"`` and the reason in ``error``.
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
