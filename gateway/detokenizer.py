"""Incremental detokenization with stop strings, shared by streaming and non-streaming replies.

Text is released only when it is final:

- a token sequence that ends inside a multi-byte UTF-8 character decodes to U+FFFD, so text is
  held back until the next token completes it (the prefix/read offset scheme of HF
  text-generation-inference and vLLM);
- text that could still grow into a stop string is held back until it cannot.

Non-streaming replies join the same deltas, so the streamed text always equals the non-streamed
text.
"""

from __future__ import annotations


class TextStream:
    """Turns a growing list of output token ids into final text deltas.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        stop: stop strings; the text ends before the first one found (it is not included).
        skip_special_tokens: drop special tokens (EOS, chat markers) from the text.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # decoded text so far (final characters only)
        self._emitted = 0  # characters of _text already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the text that became final (possibly empty).

        After a stop string is found, :attr:`stopped` is True and later pushes return ``""``.
        """
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: release what was held back (except a stop string)."""
        if self.stopped:
            return ""
        if self._read_offset < len(self.token_ids):
            prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            full = self._decode(self.token_ids[self._prefix_offset :])
            self._text += full[len(prefix) :]
            self._read_offset = len(self.token_ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if self.stop:
            # A stop string may straddle the boundary of what was already released.
            search_from = max(0, self._emitted - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self._text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
            elif not final:
                end -= self._held_back()
        end = max(end, self._emitted)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._text)), longest, -1):
                if self._text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    @property
    def text(self) -> str:
        """Everything released so far."""
        return self._text[: self._emitted]
