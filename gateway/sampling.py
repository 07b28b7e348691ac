"""Request bodies -> executor ``SamplingParams`` fields, and the checks that need the executor's geometry.

Only fields the executor knows are sent: the core ones always, the others only when they differ
from their default, so an executor that predates a feature still serves every request that does
not use it (and refuses, with a 400 naming the field, one that does).
"""

from __future__ import annotations

from typing import Any

from gateway.errors import bad_request
from gateway.limits import check_context, check_stops, effective_temperature
from gateway.openai_protocol import SamplingFields

# Sent only when not at these defaults.
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
    "min_tokens": 0, "logprobs": None, "prompt_logprobs": None, "n": 1, "use_beam_search": False,
    "beam_width": None, "logit_bias": [],
}


def stop_strings(body: SamplingFields, settings) -> list[str]:
    """Non-empty stop strings. Raises APIError(400) beyond the settings' stop-string limits."""
    return check_stops(settings, [s for s in body.stop_list() if s])


def beam_width(body: SamplingFields, n: int, best_of: int | None) -> int | None:
    """The beam width to send with ``use_beam_search``: ``beam_width``, else ``best_of``, else None
    (the executor's default). None without beam search.

    Raises:
        APIError(400): ``best_of < n``, ``best_of != n`` without beam search, or ``n > 1`` with
            beam search (it returns the best beam only).
    """
    if body.use_beam_search and n > 1:
        raise bad_request("use_beam_search returns the best beam only: n must be 1 (set the beams with best_of "
                          "or beam_width)", "n")
    if best_of is not None and best_of < n:
        raise bad_request(f"best_of ({best_of}) must be >= n ({n})", "best_of")
    if not body.use_beam_search:
        if best_of is not None and best_of != n:
            raise bad_request("best_of other than n is supported only with use_beam_search", "best_of")
        if body.beam_width is not None:
            raise bad_request("beam_width needs use_beam_search: true", "beam_width")
        return None
    return body.beam_width or best_of


DEFAULT_BEAM_WIDTH = 4  # the executor's default, for the KV-pool estimate


def growth_width(body: SamplingFields, n: int, width: int | None) -> int:
    """How many sequences of a request grow at once: the beams with beam search, else n."""
    return max(n, width or DEFAULT_BEAM_WIDTH) if body.use_beam_search else n


def executor_params(body: SamplingFields, max_tokens: int | None, n: int, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, width: int | None = None, settings=None,
                    logit_bias: list | None = None) -> dict[str, Any]:
    """The ``params`` map of an executor ``generate`` message.

    ``max_tokens`` None means "as many as fit": :func:`resolve_max_tokens` sets it once the
    executor is chosen. With ``settings``, a temperature below ``min_temperature`` is sent as 0
    (greedy). ``logit_bias``: ``[[token_id, bias], ...]`` (``gateway.limits.logit_bias_pairs``).
    """
    temperature = body.temperature if settings is None else effective_temperature(settings, body.temperature)
    params: dict[str, Any] = {
        "max_tokens": max_tokens, "temperature": temperature, "top_p": body.top_p, "top_k": body.top_k,
        "seed": body.seed, "stop_token_ids": list(body.stop_token_ids), "ignore_eos": body.ignore_eos,
    }
    optional = {
        "min_p": body.min_p, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
        "min_tokens": body.min_tokens, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs, "n": n,
        "use_beam_search": body.use_beam_search, "beam_width": width, "logit_bias": logit_bias or [],
    }
    params.update({k: v for k, v in optional.items() if v != OPTIONAL_DEFAULTS[k]})
    return params


def pool_tokens(info: dict, num_prompt: int, width: int) -> int | None:
    """The most output tokens per child that the executor's pool can ever hold (None: unknown)."""
    block_size, num_blocks = info.get("block_size"), info.get("num_blocks")
    if not block_size or not num_blocks:
        return None
    block_size, num_blocks = int(block_size), int(num_blocks)
    shared = num_prompt // block_size
    per_child_blocks = (num_blocks - shared) // max(1, width)
    return max(0, (shared + per_child_blocks) * block_size - num_prompt)


def resolve_max_tokens(params: dict, info: dict, num_prompt: int, max_model_len: int, width: int,
                       min_tokens: int = 0) -> int:
    """Fill in a missing ``max_tokens`` with the most that fits, then check ``min_tokens``.

    Raises:
        APIError(400): the prompt leaves no room to generate, or ``min_tokens > max_tokens``.
    """
    if params.get("max_tokens") is None:
        limit = min(max_model_len, int(info.get("max_model_len") or max_model_len)) - num_prompt
        room = pool_tokens(info, num_prompt, width)
        if room is not None:
            limit = min(limit, room)
        if limit < 1:
            raise bad_request(f"the prompt ({num_prompt} tokens) leaves no room to generate within the model's "
                              f"context length or the KV cache", "messages", "context_length_exceeded")
        params["max_tokens"] = limit
    if min_tokens > params["max_tokens"]:
        raise bad_request(f"min_tokens ({min_tokens}) must be <= max_tokens ({params['max_tokens']})", "min_tokens")
    return params["max_tokens"]


def blocks_needed(num_prompt: int, max_tokens: int, block_size: int, width: int) -> int:
    """KV blocks a request needs at its longest, with ``width`` children sharing the prompt's full
    blocks (copy-on-write gives each child its own copy of the partial last block)."""
    total = num_prompt + max_tokens
    shared = num_prompt // block_size
    per_child = -(-total // block_size) - shared
    return shared + width * per_child


def check_fits(info: dict, num_prompt: int, max_tokens: int, max_model_len: int, width: int = 1) -> None:
    """Refuse a request that can never run on the executor.

    Raises:
        APIError(400, code ``context_length_exceeded``): prompt + max_tokens beyond max_model_len.
        APIError(400, code ``kv_cache_too_small``): more KV blocks than the executor's pool has.
    """
    limit = min(max_model_len, int(info.get("max_model_len") or max_model_len))
    check_context(None, num_prompt, max_tokens, "max_tokens", limit)
    block_size, num_blocks = info.get("block_size"), info.get("num_blocks")
    if block_size and num_blocks:
        need = blocks_needed(num_prompt, max_tokens, int(block_size), width)
        if need > int(num_blocks):
            raise bad_request(
                f"The request needs {need} KV blocks at its longest but the executor's pool has only "
                f"{num_blocks} blocks of {block_size} tokens; reduce the prompt, max_tokens or n.",
                "max_tokens", "kv_cache_too_small")
