"""Incremental detokenization and streaming: whole UTF-8 characters only, stop strings held back,
and the joined stream always equal to the non-streamed text."""

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.detokenizer import TextStream
from tests.gateway.fakes import fake_app, serve_in_thread

MODEL = "fake-model"
TEXTS = ["Hello world! 你好，世界。🙂👍🏽 naïve café — ok", "日本語のテキストと絵文字🎉🎉 mixed with English",
         "stop here STOP there", "ab" * 20]


def run_stream(tok, ids, stop, splits):
    """Push ``ids`` in pieces (sizes cycling through ``splits``); return (deltas, stream)."""
    ts = TextStream(tok, stop)
    deltas, i, k = [], 0, 0
    while i < len(ids) and not ts.stopped:
        n = splits[k % len(splits)]
        deltas.append(ts.push(ids[i:i + n]))
        i, k = i + n, k + 1
    deltas.append(ts.finish())
    return deltas, ts


def reference(tok, ids, stop):
    text = tok.decode(ids, skip_special_tokens=True)
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_split_a_character(tok, text):
    ids = tok.encode(text)
    deltas, _ = run_stream(tok, ids, [], [1])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_spanning_tokens_is_held_back_and_cut(tok):
    text = "The answer is forty-two, says the computer."
    ids = tok.encode(text)
    deltas, ts = run_stream(tok, ids, ["forty-two"], [1])
    assert "".join(deltas) == "The answer is " and ts.stopped
    # Nothing that could be the start of the stop string was released before the match.
    released = ""
    for d in deltas:
        released += d
        assert "forty" not in released


def test_held_back_prefix_is_released_when_it_does_not_match(tok):
    ids = tok.encode("for the win")
    deltas, ts = run_stream(tok, ids, ["forty"], [1])
    assert "".join(deltas) == "for the win" and not ts.stopped


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.sampled_from(TEXTS), stops=st.lists(st.sampled_from(["STOP", "界", "🎉", "ok", " w", "abab", "é"]),
                                                  max_size=3),
       splits=st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_any_split_gives_the_reference_text(tok, text, stops, splits):
    ids = tok.encode(text)
    deltas, _ = run_stream(tok, ids, stops, splits)
    assert "".join(deltas) == reference(tok, ids, stops)
    assert not any("\ufffd" in d for d in deltas)


def test_a_fast_tokenizer_is_decoded_by_its_backend_with_the_same_text(tok, monkeypatch):
    """SmolLM2's tokenizer (no clean-up of spaces) skips transformers' decode wrappers; one that
    cleans up spaces, or whose class decodes its own way, keeps transformers' decode."""
    ids = tok.encode(TEXTS[0] + TEXTS[1])
    fast = TextStream(tok, ["STOP"])
    assert fast._backend_decode is not None
    calls = []
    monkeypatch.setattr(type(tok), "decode", lambda self, *a, **k: calls.append(a) or "")
    assert "".join(fast.push([i]) for i in ids) + fast.finish() == TEXTS[0] + TEXTS[1]
    assert calls == []  # transformers' decode was never called
    monkeypatch.undo()
    with_special = tok.encode("Hi") + [tok.eos_token_id] + tok.encode(" there")
    for skip in (True, False):
        ts = TextStream(tok, skip_special_tokens=skip)
        assert ts._backend_decode is not None
        streamed = "".join(ts.push([i]) for i in with_special) + ts.finish()
        assert streamed == tok.decode(with_special, skip_special_tokens=skip)
        assert (tok.eos_token in streamed) is not skip

    monkeypatch.setattr(tok, "clean_up_tokenization_spaces", True)
    assert TextStream(tok)._backend_decode is None
    monkeypatch.undo()
    custom = type("CustomDecode", (type(tok),), {"_decode": lambda self, ids, **kw: "custom"})
    monkeypatch.setattr(tok, "__class__", custom)
    assert TextStream(tok)._backend_decode is None
    assert TextStream(object())._backend_decode is None  # not a fast tokenizer at all


# ----------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def server(tok):
    reply = {"text": TEXTS[0]}

    def script(prompt_ids, params, index):
        return tok.encode(reply["text"], add_special_tokens=False)

    app, executors, _ = fake_app(tok, executor_kwargs={"reply": script, "token_delay_s": 0.001})
    with serve_in_thread(app) as base:
        yield {"base": base, "reply": reply,
               "client": openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30)}


@pytest.mark.parametrize("text", TEXTS[:3])
@pytest.mark.parametrize("stop", [None, ["世界"], ["English", "🎉🎉"], ["there"]])
def test_streamed_equals_non_streamed(server, text, stop):
    server["reply"]["text"] = text
    c = server["client"]
    kw = dict(model=MODEL, max_tokens=200, stop=stop)
    full = c.chat.completions.create(messages=[{"role": "user", "content": "x"}], **kw).choices[0]
    chunks = list(c.chat.completions.create(messages=[{"role": "user", "content": "x"}], stream=True, **kw))
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(deltas) == full.message.content
    assert not any("\ufffd" in d for d in deltas)
    assert not any(s in full.message.content for s in (stop or []))
    assert chunks[-1].choices[0].finish_reason == full.finish_reason

    fullc = c.completions.create(prompt="x", **kw).choices[0]
    chunks = list(c.completions.create(prompt="x", stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == fullc.text == full.message.content


def byte_ids(tok, data: bytes) -> list[int]:
    """One token per byte: the byte-level BPE's single-byte tokens (GPT-2's byte-to-unicode map)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    return [tok.convert_tokens_to_ids(chars[b]) for b in data]


def test_bytes_that_never_form_a_character_are_released_as_they_come(tok):
    """A run of lone UTF-8 continuation bytes (what one c=64 request's greedy output was) is never
    a character: its U+FFFDs come 3 tokens behind the newest, not all at the end."""
    ids = byte_ids(tok, bytes([0x80 + i % 6 for i in range(200)]))
    deltas, _ = run_stream(tok, ids, [], [1])
    assert "".join(deltas) == reference(tok, ids, []) == "\ufffd" * 200
    assert all(d == "\ufffd" for d in deltas[3:200]) and deltas[:3] == ["", "", ""]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.one_of(st.binary(min_size=1, max_size=3),
                               st.sampled_from(["é", "界", "🎉", "a", " ok"]).map(str.encode)),
                     min_size=1, max_size=40).map(b"".join),
       splits=st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_any_bytes_in_any_split_give_the_decoded_text(tok, data, splits):
    """Valid characters split across tokens, invalid bytes, and both mixed: the joined deltas are
    the whole decode, and a delta holds U+FFFD only where the whole decode does."""
    ids = byte_ids(tok, data)
    deltas, _ = run_stream(tok, ids, [], splits)
    whole = reference(tok, ids, [])
    assert "".join(deltas) == whole
    if "\ufffd" not in whole:
        assert not any("\ufffd" in d for d in deltas)
