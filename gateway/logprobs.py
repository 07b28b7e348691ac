"""Executor logprob entries -> the OpenAI ``logprobs`` objects of completions and chat.

The executor sends, per generated token, ``{"token_id", "logprob", "top": [[id, logprob], ...]}``
(``top`` holds the requested number of most likely alternatives), and for the prompt a list whose
first item is None (the first token has no context) followed by entries of the same shape.
"""

from __future__ import annotations

from typing import Any

from gateway.tokenization import TokenText


def normalize_entry(entry: Any, token_id: int | None = None) -> dict | None:
    """Accept an executor entry in the documented shape, or a ``{token_id: logprob}`` map
    (vLLM's prompt-logprobs shape, with ``token_id`` the actual token); None stays None."""
    if entry is None:
        return None
    if isinstance(entry, dict) and "logprob" in entry:
        top = [(int(t), float(lp)) for t, lp in (entry.get("top") or [])]
        return {"token_id": int(entry.get("token_id", token_id if token_id is not None else -1)),
                "logprob": float(entry["logprob"]), "top": top}
    if isinstance(entry, dict):
        items = sorted(((int(t), float(lp)) for t, lp in entry.items()), key=lambda x: -x[1])
        lp = dict(items).get(token_id, items[0][1] if items else 0.0)
        return {"token_id": token_id, "logprob": lp, "top": [x for x in items if x[0] != token_id]}
    return None


def prompt_entries(prompt_ids: list[int], prompt_logprobs: list | None) -> list[dict | None]:
    """One entry per prompt token (the first None), from the executor's prompt logprobs."""
    out: list[dict | None] = []
    for i, token_id in enumerate(prompt_ids):
        raw = prompt_logprobs[i] if prompt_logprobs and i < len(prompt_logprobs) else None
        entry = normalize_entry(raw, token_id)
        if entry is not None:
            entry["token_id"] = token_id
        out.append(entry)
    return out


def completion_logprobs(tt: TokenText, token_ids: list[int], entries: list[dict | None], num_top: int,
                        text_offset: int = 0) -> dict:
    """The legacy completions object: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``.

    ``top_logprobs[i]`` maps token text to logprob for the ``num_top`` most likely tokens plus the
    chosen one (so up to ``num_top + 1`` keys), None where the entry is None (first prompt token).

    Args:
        text_offset: character offset of the first token within the choice's text.
    """
    tokens, lps, tops, offsets = [], [], [], []
    offset = text_offset
    for token_id, entry in zip(token_ids, entries):
        text = tt.text(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(entry["logprob"])
        top = {}
        for t, lp in entry["top"][:num_top]:
            top.setdefault(tt.text(t), lp)
        top.setdefault(text, entry["logprob"])
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def merge_completion_logprobs(parts: list[dict]) -> dict | None:
    """Concatenate several completions logprobs objects (streamed deltas, echo + generated)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    return {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_logprobs(tt: TokenText, entries: list[dict], num_top: int) -> dict:
    """The chat object: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": None}``."""
    content = []
    for entry in entries:
        text, raw = tt.get(entry["token_id"])
        top = [{"token": tt.text(t), "logprob": lp, "bytes": tt.bytes(t)} for t, lp in entry["top"][:num_top]]
        content.append({"token": text, "logprob": entry["logprob"], "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}
