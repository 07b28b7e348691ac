"""Prompts to token ids (completions prompts, chat templates) and token ids to display text/bytes."""

from __future__ import annotations

from functools import lru_cache

from gateway.errors import bad_request


class Prompt:
    """One prompt of a request: its token ids and the text it echoes (completions ``echo``).

    A prompt given as token ids is decoded only when its text is asked for: only ``echo`` needs it.
    """

    __slots__ = ("token_ids", "_text", "_tokenizer")

    def __init__(self, token_ids: list[int], text: str | None = None, tokenizer=None):
        if text is None and tokenizer is None:
            raise ValueError("a Prompt needs its text or a tokenizer to decode it")
        self.token_ids = token_ids
        self._text = text
        self._tokenizer = tokenizer

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._tokenizer.decode(self.token_ids)
        return self._text


def vocab_size(tokenizer) -> int:
    return len(tokenizer)


def _check_ids(tokenizer, ids: list[int], param: str) -> None:
    vocab = vocab_size(tokenizer)
    if not ids:
        raise bad_request(f"{param} must not be empty", param)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param)


def completion_prompts(tokenizer, prompt) -> list[Prompt]:
    """The prompts of a completions request: a string, strings, token ids, or lists of token ids.

    Raises:
        APIError(400): an empty prompt or list, or a token id outside the vocabulary.
    """
    if isinstance(prompt, str):
        items = [prompt]
    elif not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    elif isinstance(prompt[0], int):
        items = [list(prompt)]
    else:
        items = list(prompt)
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request("prompt must not be empty", "prompt")
            ids = tokenizer.encode(item)
            if not ids:
                raise bad_request("prompt has no tokens", "prompt")
            out.append(Prompt(ids, item))
        else:
            _check_ids(tokenizer, item, "prompt")
            out.append(Prompt(list(item), tokenizer=tokenizer))
    return out


def chat_prompt(tokenizer, messages, add_generation_prompt: bool = True) -> Prompt:
    """Format chat messages with the model's chat template and tokenize them.

    ``developer`` messages are given to the template as ``system``.

    Raises:
        APIError(400): the template rejects the conversation, or it has no tokens.
    """
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # jinja raises for conversations the template rejects
        raise bad_request(f"messages could not be formatted with the model's chat template: {exc}", "messages")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("messages have no tokens", "messages")
    return Prompt(ids, text)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2): each byte maps to one printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenText:
    """Display text and UTF-8 bytes of single tokens (for logprobs), cached per token id.

    Byte-level BPE tokens (GPT-2 style, as SmolLM2's) map back to their exact bytes, so a token
    that holds half a UTF-8 character reports its true bytes; its text shows U+FFFD for them.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        if token_id not in special:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = _byte_decoder()
            if isinstance(piece, str) and piece and all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
                return raw.decode("utf-8", errors="replace"), list(raw)
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode("utf-8"))

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            if not 0 <= token_id < vocab_size(self.tokenizer):
                return f"<token {token_id}>", []
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self.get(token_id)[1]
