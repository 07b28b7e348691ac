"""Errors in the OpenAI shape: 400 for bad parameters, 401, 403, 404, 413, 503 + Retry-After; never 500."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from tests.gateway.fakes import SAMPLING_FIELDS, fake_app, serve_in_thread

MODEL = "fake-model"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tok):
    # A small KV pool (32 blocks x 16 tokens = 512 tokens) below the context length (2048).
    app, executors, bm = fake_app(tok, executor_kwargs={"num_blocks": 32}, max_body_bytes=64 * 1024)
    with serve_in_thread(app) as base:
        yield {"base": base, "ex": executors[0], "bm": bm}


def assert_openai_error(r: httpx.Response, status: int, param=...):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not ...:
        assert err["param"] == param, err
    return err


BAD_COMPLETIONS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 10**6]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": 1000}, "n"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),  # fits the context, never the KV pool
    # JSON types as the OpenAI API takes them: no string, boolean or float where an integer goes.
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "hi", "n": 2.0}, "n"),
    ({"prompt": "hi", "stream": "false"}, "stream"),
    ({"prompt": "hi", "max_tokens": 100, "n": 8}, "max_tokens"),  # 8 children need too many blocks
    ({"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"prompt": "hi", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "stop": ["x"] * 17}, "stop"),
    ({"prompt": "hi", "seed": 2**70}, "seed"),
    ({"prompt": "hi", "priority": -(2**70)}, "priority"),
    ({"prompt": "hi", "stop_token_ids": [-3]}, "stop_token_ids"),
    ({"prompt": "hi", "presence_penalty": 9}, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "top_k": -2}, "top_k"),
    ({"prompt": "hi", "min_p": 1.5}, "min_p"),
    ({"prompt": "hi", "cache_salt": ""}, "cache_salt"),
    ({"prompt": "hi", "stream_options": "yes"}, "stream_options"),
    ({"prompt": "hi", "suffix": "tail"}, "suffix"),
    ({}, "prompt"),
]

BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": "not a list"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "contnet": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "max_completion_tokens": -3}, "max_completion_tokens"),
    ({"messages": MSG, "max_completion_tokens": "7"}, "max_completion_tokens"),
    ({"messages": MSG, "logprobs": "yes"}, "logprobs"),
    ({"messages": MSG, "max_tokens": 100000}, "max_tokens"),
    ({"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "word " * 700}]}, "messages"),  # no room left in the KV pool
]


@pytest.mark.parametrize("body, param", BAD_COMPLETIONS)
def test_bad_completion_requests_get_400(server, body, param):
    assert_openai_error(httpx.post(server["base"] + "/v1/completions", json=body, timeout=10), 400, param)


@pytest.mark.parametrize("body, param", BAD_CHATS)
def test_bad_chat_requests_get_400(server, body, param):
    assert_openai_error(httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=10), 400, param)


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "hi"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                                        ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})])
def test_an_unknown_model_gets_404_model_not_found(server, path, body):
    """As the OpenAI API answers it (status 404, code model_not_found), naming the served model."""
    r = httpx.post(server["base"] + path, json={**body, "model": "gpt-5"}, timeout=10)
    assert_openai_error(r, 404, "model")
    assert r.json()["error"]["code"] == "model_not_found" and "fake-model" in r.json()["error"]["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b'"str"', b"null"])
def test_malformed_bodies_get_400(server, content):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        r = httpx.post(server["base"] + path, content=content, headers={"content-type": "application/json"})
        assert_openai_error(r, 400)


@pytest.mark.parametrize("content", [
    b'{"prompt": "\\udc00abc"}', b'{"prompt": "abc", "stop": ["\\ud800"]}', b'{"prompt": "a", "model": "\\ud800"}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b'{"prompt": "abc", "user": "\\udfff"}',
    b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}",
])
def test_lone_surrogates_and_deep_nesting_get_400(server, content):
    path = "/v1/chat/completions" if b"messages" in content else "/v1/completions"
    r = httpx.post(server["base"] + path, content=content, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_the_server_keeps_serving_after_bad_input(server):
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=1)
    assert client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices[0].finish_reason == "length"


def test_unknown_routes_and_methods(server):
    err = assert_openai_error(httpx.get(server["base"] + "/v1/nothing"), 404)
    assert err["type"] == "not_found_error"
    assert_openai_error(httpx.get(server["base"] + "/v1/completions"), 405)


def test_body_over_the_limit_gets_413(server):
    big = {"prompt": "x" * (70 * 1024)}
    assert_openai_error(httpx.post(server["base"] + "/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: chunked transfer
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(server["base"] + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    assert httpx.post(server["base"] + "/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_an_executor_refusal_is_a_400(tok):
    # An executor that predates min_p refuses it; the gateway says so with a 400.
    app, _, _ = fake_app(tok, executor_kwargs={"known_params": SAMPLING_FIELDS - {"min_p"}})
    with serve_in_thread(app) as base:
        for stream in (False, True):
            r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "min_p": 0.2, "stream": stream})
            assert "min_p" in assert_openai_error(r, 400)["message"]
        assert httpx.post(base + "/v1/completions", json={"prompt": "hi"}).status_code == 200


def test_a_failure_mid_stream_is_an_error_event(tok):
    app, _, _ = fake_app(tok, executor_kwargs={"fail_after_tokens": 3})
    with serve_in_thread(app) as base:
        body = {"prompt": "hi", "max_tokens": 10, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "scripted" in json.loads(events[-2])["error"]["message"]
        assert len(events) == 5  # three tokens, the error, [DONE]
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError):
            list(client.completions.create(model=MODEL, prompt="hi", max_tokens=10, stream=True))
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 10})
        assert "scripted" in assert_openai_error(r, 400)["message"]


def test_api_key(tok):
    app, _, _ = fake_app(tok, api_keys=["sk-secret"])
    with serve_in_thread(app) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model=MODEL, prompt="hi", max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        assert_openai_error(httpx.post(base + "/v1/completions", json={"prompt": "hi"}), 401)  # no key at all
        r = httpx.post(base + "/tokenize", json={"prompt": "x"})
        assert assert_openai_error(r, 401)["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        ok = openai.OpenAI(base_url=base + "/v1", api_key="sk-secret", max_retries=0)
        assert ok.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices
        for open_path in ("/health", "/version", "/metrics"):
            assert httpx.get(base + open_path).status_code == 200


def test_admin_key_and_loopback(tok):
    app, _, _ = fake_app(tok, admin_key="admin-secret", api_keys=["sk-secret"])
    with serve_in_thread(app) as base:
        assert_openai_error(httpx.get(base + "/admin/cache"), 401)
        assert_openai_error(httpx.get(base + "/admin/cache", headers={"Authorization": "Bearer sk-secret"}), 401)
        ok = httpx.get(base + "/admin/cache", headers={"Authorization": "Bearer admin-secret"})
        assert ok.status_code == 200 and "executors" in ok.json()

    # Without --admin-key: loopback only.
    app, _, _ = fake_app(tok)

    async def ask(client_host):
        transport = httpx.ASGITransport(app=app, client=(client_host, 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            return await c.get("/admin/executors")

    assert_openai_error(asyncio.run(ask("10.1.2.3")), 403)
    assert_openai_error(asyncio.run(ask("192.168.0.7")), 403)


def test_queue_full_gets_429_with_retry_after(tok):
    app, executors, _ = fake_app(tok, max_waiting_sequences=1, executor_kwargs={"first_token_delay_s": 1.0})
    with serve_in_thread(app) as base:
        results = {}

        def slow():
            results["first"] = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)

        t = threading.Thread(target=slow)
        t.start()
        while not executors[0].received:
            pass
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        err = assert_openai_error(r, 429)
        assert err["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
        t.join()
        assert results["first"].status_code == 200
        assert httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_no_executor_gets_503_and_health_says_so(tok):
    app, executors, bm = fake_app(tok, num_executors=2)
    with serve_in_thread(app) as base:
        executors[0].down = True
        assert httpx.get(base + "/health").status_code == 200  # one of two suffices
        executors[1].down = True
        h = httpx.get(base + "/health", timeout=10)
        assert h.status_code == 503 and h.json()["status"] == "unhealthy"
        # /health pings; routing follows the monitor's probes, which notice an executor that stopped
        # answering (connected, not dead: a dead one is noticed at once) within a round or two.
        deadline = time.monotonic() + 5
        while any(e["healthy"] for e in httpx.get(base + "/admin/executors", timeout=10).json()["executors"]):
            assert time.monotonic() < deadline, "the monitor did not notice the silent executors"
            time.sleep(0.1)
        for stream in (False, True):
            r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "stream": stream}, timeout=10)
            assert assert_openai_error(r, 503)["code"] == "no_executor" and r.headers["retry-after"]
        executors[0].down = executors[1].down = False
        assert httpx.post(base + "/v1/completions", json={"prompt": "hi"}, timeout=10).status_code == 200
        bm.down = True
        assert httpx.get(base + "/health").status_code == 503
        assert assert_openai_error(httpx.get(base + "/admin/cache"), 503)["code"] == "blockmgr_unavailable"
        # Routing does not need the block manager: requests still run.
        assert httpx.post(base + "/v1/completions", json={"prompt": "hi"}, timeout=10).status_code == 200
        assert httpx.get(base + "/metrics").status_code == 200
        bm.down = False


def test_openapi_documents_400_not_422(server):
    schema = httpx.get(server["base"] + "/openapi.json").json()
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (path, method)
    assert "400" in schema["paths"]["/v1/completions"]["post"]["responses"]
    assert json.dumps(schema)  # serializable
