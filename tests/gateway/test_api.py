"""The OpenAI API surface against fake executors (no model): every parameter, through the official client."""

import httpx
import openai
import pytest

from tests.gateway.fakes import DEFAULT_REPLY, fake_app, serve_in_thread

MODEL = "fake-model"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(tok):
    app, executors, bm = fake_app(tok)
    with serve_in_thread(app) as base:
        yield {"base": base, "ex": executors[0], "bm": bm, "app": app}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="none", max_retries=0, timeout=30)


def last_params(server) -> dict:
    return server["ex"].received[-1]


def test_completion_prompt_forms(client, server, tok):
    ids = tok.encode("Once upon a time")
    for prompt, num_prompts in [("Once upon a time", 1), (["One", "Two"], 2), (ids, 1), ([ids, ids[:2]], 2)]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, n=2)
        assert [c.index for c in r.choices] == list(range(2 * num_prompts))
        assert all(c.text == DEFAULT_REPLY and c.finish_reason == "stop" for c in r.choices)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert last_params(server)["prompt_token_ids"] == ids[:2]


def test_every_sampling_parameter_reaches_the_executor(client, server):
    client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=7, temperature=0.5, top_p=0.9, n=2, seed=1234, stop=["zzz"],
        presence_penalty=0.5, frequency_penalty=-0.5, user="alice", logprobs=1,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2, "ignore_eos": True,
                    "stop_token_ids": [7], "cache_salt": "tenant-a", "priority": 3})
    got = last_params(server)
    assert got["params"] == {
        "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 1234, "stop_token_ids": [7],
        "ignore_eos": True, "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.2, "min_tokens": 2, "logprobs": 1, "n": 2}
    assert got["cache_salt"] == "tenant-a" and got["priority"] == 3

    client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3,
                                   extra_body={"use_beam_search": True, "beam_width": 3})
    assert last_params(server)["params"] == {
        "max_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop_token_ids": [],
        "ignore_eos": False, "use_beam_search": True, "beam_width": 3}
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, best_of=5, extra_body={"use_beam_search": True})
    assert last_params(server)["params"]["beam_width"] == 5
    with pytest.raises(openai.BadRequestError) as exc:  # the best beam only: n names the problem
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, n=2, extra_body={"use_beam_search": True})
    assert exc.value.body["param"] == "n" and "best beam only" in exc.value.body["message"]


def test_defaults_send_only_the_core_fields(client, server):
    client.completions.create(model=MODEL, prompt="Hi")
    assert set(last_params(server)["params"]) == {"max_tokens", "temperature", "top_p", "top_k", "seed",
                                                   "stop_token_ids", "ignore_eos"}
    assert last_params(server)["params"]["max_tokens"] == 16


def test_echo_and_logprobs(client, tok):
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, echo=True, logprobs=2)
    c = r.choices[0]
    n_prompt = len(tok.encode("The sky is"))
    assert c.text.startswith("The sky is") and c.finish_reason == "length"
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == c.text


def test_echo_with_max_tokens_0_is_lm_eval_loglikelihood(client, server, tok):
    prompt = "The capital of France is Paris"
    ids = tok.encode(prompt)
    before = len(server["ex"].received)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True)
    assert len(server["ex"].received) == before  # answered from the tokenizer alone
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)

    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    sent = last_params(server)["params"]
    assert sent["max_tokens"] == 1 and sent["prompt_logprobs"] == 1 and "logprobs" not in sent
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert len(c.logprobs.token_logprobs) == len(ids)
    assert c.logprobs.token_logprobs[0] is None and all(x < 0 for x in c.logprobs.token_logprobs[1:])
    # lm-eval's is_greedy check: the chosen token must be a key of its top_logprobs.
    assert all(tok_s in top for tok_s, top in zip(c.logprobs.tokens[1:], c.logprobs.top_logprobs[1:]))


def test_chat_messages_and_content_parts(client, server, tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}]},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=100)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == DEFAULT_REPLY
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "Say hello."}
            for m in messages]
    expect = tok.encode(tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)
    assert last_params(server)["prompt_token_ids"] == expect
    assert r.usage.prompt_tokens == len(expect)


def test_chat_n_logprobs_and_limits(client, server):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, n=3, logprobs=True, top_logprobs=2,
                                       seed=7, temperature=0.7, top_p=0.8, stop=["never"],
                                       presence_penalty=1, frequency_penalty=1)
    assert len(r.choices) == 3 and all(c.finish_reason == "length" for c in r.choices)
    for c in r.choices:
        assert len(c.logprobs.content) == 4
        for entry in c.logprobs.content:
            assert len(entry.top_logprobs) == 2 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert r.usage.completion_tokens == 12
    assert last_params(server)["params"]["logprobs"] == 2
    # max_completion_tokens wins over max_tokens
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=9, max_completion_tokens=5)
    assert last_params(server)["params"]["max_tokens"] == 5


def test_chat_without_max_tokens_gets_the_room_that_fits(client, server):
    client.chat.completions.create(model=MODEL, messages=CHAT)
    got = last_params(server)
    assert len(got["prompt_token_ids"]) + got["params"]["max_tokens"] == 2048


def test_usage_reports_cached_prompt_tokens(client):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 8
    first = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2)
    second = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 16


def test_streamed_usage_chunk_only_when_asked(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, max_tokens=5))
    assert all(c.usage is None for c in chunks)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, max_tokens=5,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", stream=True, max_tokens=5))
    assert all(c.usage is None for c in chunks)
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", stream=True, max_tokens=5,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5


def test_streamed_n_choices_each_end_once(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, n=3, max_tokens=50))
    texts = {i: "" for i in range(3)}
    finishes = {i: [] for i in range(3)}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index].append(ch.finish_reason)
    assert all(t == DEFAULT_REPLY for t in texts.values())
    assert all(f == ["stop"] for f in finishes.values())


def test_streamed_echo_and_logprobs_join_to_the_non_streamed(client):
    kw = dict(model=MODEL, prompt="Hello", max_tokens=30, echo=True, logprobs=1)
    full = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.text_offset]
    assert text == full.text and tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset


def test_tokenize_detokenize_models_version_health(server, client, tok):
    base = server["base"]
    r = httpx.post(base + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
    r2 = httpx.post(base + "/tokenize", json={"messages": CHAT, "return_token_strs": True}).json()
    assert r2["count"] > 5 and len(r2["token_strs"]) == r2["count"]
    assert httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert httpx.get(base + "/version").json()["version"]
    assert httpx.get(base + "/health").status_code == 200
