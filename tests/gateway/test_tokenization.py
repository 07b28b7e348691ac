"""Prompts to token ids: each prompt is encoded or decoded once, and only when its text is needed."""

from gateway.tokenization import completion_prompts


class CountingTokenizer:
    """Wraps a tokenizer and counts its encode and decode calls."""

    def __init__(self, tok):
        self.tok = tok
        self.encodes = self.decodes = 0

    def __len__(self):
        return len(self.tok)

    def encode(self, text, **kw):
        self.encodes += 1
        return self.tok.encode(text, **kw)

    def decode(self, ids, **kw):
        self.decodes += 1
        return self.tok.decode(ids, **kw)


def test_token_id_prompts_are_decoded_only_for_echo(tok):
    counting = CountingTokenizer(tok)
    ids = tok.encode("Hello there, world")
    (prompt,) = completion_prompts(counting, ids)
    assert prompt.token_ids == ids and counting.decodes == 0  # no echo asked for: never decoded
    assert prompt.text == tok.decode(ids) and prompt.text == tok.decode(ids)
    assert counting.decodes == 1  # decoded once, then kept


def test_text_prompts_are_encoded_once_and_keep_their_text(tok):
    counting = CountingTokenizer(tok)
    prompts = completion_prompts(counting, ["one prompt", "another prompt"])
    assert [p.text for p in prompts] == ["one prompt", "another prompt"]
    assert [p.token_ids for p in prompts] == [tok.encode("one prompt"), tok.encode("another prompt")]
    assert counting.encodes == 2 and counting.decodes == 0
