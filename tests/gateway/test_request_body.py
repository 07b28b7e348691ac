"""How the generation endpoints read a request body: one wording for token-count bounds on both,
a clear 400 for a body that is not JSON, and a warning (not an error) for unknown fields."""

import json
import logging

import httpx
import pytest

from tests.gateway.fakes import fake_app, serve_in_thread

MSG = [{"role": "user", "content": "hi"}]
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def base(tok):
    app, _, _ = fake_app(tok)
    with serve_in_thread(app) as url:
        yield url


def error_of(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize("path, body, field, value", [
    (COMPLETIONS, {"prompt": "hi"}, "max_tokens", -1),
    (COMPLETIONS, {"prompt": "hi"}, "max_tokens", 0),
    (CHAT, {"messages": MSG}, "max_tokens", -1),
    (CHAT, {"messages": MSG}, "max_tokens", 0),
    (CHAT, {"messages": MSG}, "max_completion_tokens", -1),
    (CHAT, {"messages": MSG}, "max_completion_tokens", 0),
])
def test_a_token_count_below_one_gets_the_same_message_on_both_endpoints(base, path, body, field, value):
    """vLLM's wording (SamplingParams: "max_tokens must be at least 1, got 0"), naming the param."""
    err = error_of(httpx.post(base + path, json={**body, field: value}, timeout=10))
    assert err["param"] == field
    assert err["message"].startswith(f"{field} must be at least 1, got {value}"), err


@pytest.mark.parametrize("value", [0, -1])
def test_max_tokens_below_one_on_completions_says_echo_allows_0(base, value):
    err = error_of(httpx.post(base + COMPLETIONS, json={"prompt": "hi", "max_tokens": value}, timeout=10))
    assert err["message"] == f"max_tokens must be at least 1, got {value} (0 is allowed only with echo)"
    ok = httpx.post(base + COMPLETIONS, json={"prompt": "hi", "max_tokens": 0, "echo": True}, timeout=10)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "hi"


@pytest.mark.parametrize("path, body", [(COMPLETIONS, {"prompt": "hi", "max_tokens": 2}),
                                        (CHAT, {"messages": MSG, "max_tokens": 2})])
@pytest.mark.parametrize("content_type, named", [
    (None, "no Content-Type"),
    ("text/plain", "Content-Type: text/plain"),
    ("application/x-www-form-urlencoded", "Content-Type: application/x-www-form-urlencoded"),  # curl -d
])
def test_a_json_body_without_the_json_content_type_is_told_so(base, path, body, content_type, named):
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(base + path, content=json.dumps(body).encode(), headers=headers, timeout=10)
    err = error_of(r)
    assert err["message"] == f"the request body must be JSON (Content-Type: application/json); this request has {named}"
    assert err["param"] is None
    # The same body with the JSON media type (parameters allowed) is served.
    ok = httpx.post(base + path, content=json.dumps(body).encode(),
                    headers={"content-type": "application/json; charset=utf-8"}, timeout=10)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("content, what", [(b"[1, 2]", "an array"), (b'"hi"', "a string"), (b"3", "a number"),
                                           (b"true", "a boolean")])
def test_json_that_is_not_an_object_is_told_so(base, content, what):
    r = httpx.post(base + COMPLETIONS, content=content, headers={"content-type": "application/json"}, timeout=10)
    assert error_of(r)["message"] == f"the request body must be a JSON object, not {what}"


def test_a_body_that_is_not_json_names_the_parse_error(base):
    r = httpx.post(base + COMPLETIONS, content=b"{prompt: hi}", headers={"content-type": "application/json"}, timeout=10)
    assert error_of(r)["message"].startswith("the request body is not valid JSON: ")


def _unknown_field_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pagedserve.gateway" and "ignored unknown fields" in r.getMessage()]


@pytest.mark.parametrize("path, body", [(COMPLETIONS, {"prompt": "hi", "max_tokens": 2}),
                                        (CHAT, {"messages": MSG, "max_tokens": 2}),
                                        ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})])
def test_unknown_fields_are_served_with_one_warning_naming_them(base, caplog, path, body):
    """As vLLM does: the request is served; one line names every ignored field."""
    with caplog.at_level(logging.WARNING, logger="pagedserve.gateway"):
        r = httpx.post(base + path, json={**body, "foo": 1, "bar\nbaz": {"x": 2}}, timeout=10)
        assert r.status_code == 200, r.text
        known = httpx.post(base + path, json=body, timeout=10)
        assert known.status_code == 200, known.text
    lines = _unknown_field_lines(caplog)
    assert lines == [f"POST {path}: ignored unknown fields 'bar\\nbaz', 'foo'"]


def test_unknown_fields_of_nested_objects_are_named_with_their_path(base, caplog):
    with caplog.at_level(logging.WARNING, logger="pagedserve.gateway"):
        r = httpx.post(base + CHAT, json={"messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "hi", "mood": "curious"}],
                                          "max_tokens": 2, "stream": True,
                                          "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
                       timeout=10)
        assert r.status_code == 200, r.text
        r = httpx.post(base + CHAT, json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}], "max_tokens": 2}, timeout=10)
        assert r.status_code == 200, r.text
    assert _unknown_field_lines(caplog) == [
        f"POST {CHAT}: ignored unknown fields 'messages[1].mood', 'stream_options.continuous_usage_stats'",
        f"POST {CHAT}: ignored unknown fields 'messages[0].content[0].cache_control'"]


def test_the_warning_names_at_most_ten_fields(base, caplog):
    extra = {f"field_{i:02d}_{'x' * 60}": i for i in range(13)}
    with caplog.at_level(logging.WARNING, logger="pagedserve.gateway"):
        r = httpx.post(base + COMPLETIONS, json={"prompt": "hi", "max_tokens": 1, **extra}, timeout=10)
    assert r.status_code == 200, r.text
    [line] = _unknown_field_lines(caplog)
    assert line.endswith(" and 3 more") and line.count("'field_") == 10
    assert "'field_00_" + "x" * 31 + "'" in line  # each name cut to 40 characters


def test_a_refused_request_logs_no_unknown_field_warning(base, caplog):
    with caplog.at_level(logging.WARNING, logger="pagedserve.gateway"):
        error_of(httpx.post(base + CHAT, json={"messages": MSG, "max_tokens": 0, "foo": 1}, timeout=10))
    assert _unknown_field_lines(caplog) == []
