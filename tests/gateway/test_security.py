"""The HTTP-side attacks of issue 13, each shown to do no harm: unbounded requests, queue bypass by
batches, stop strings that stall the event loop, extreme priorities and temperatures, ignored
logit_bias, the cached_tokens oracle across tenants, unauthenticated /metrics whose cost grows
with the blocks, and n > 1 siblings decoding after their choice was answered."""

import threading
import time

import httpx
import pytest

from blockmgr.manager import BlockManager
from gateway.auth import tenant_of
from gateway.detokenizer import TextStream
from gateway.limits import DEFAULT_LIMITS
from tests.gateway.fakes import fake_app, serve_in_thread

LONG_PROMPT = "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole. " * 3


@pytest.fixture(scope="module")
def server(tok):
    app, executors, bm = fake_app(tok)
    with serve_in_thread(app) as base:
        yield {"base": base, "ex": executors[0], "bm": bm}


def error(r: httpx.Response, status: int, param=..., code=...) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


def post(base, body, path="/v1/completions", **kw):
    return httpx.post(base + path, json=body, timeout=30, **kw)


# ---------------------------------------------------------------------------------- bounded work
def test_prompts_times_n_is_bounded_before_any_work(server):
    base, ex = server["base"], server["ex"]
    before = len(ex.received)
    limit = DEFAULT_LIMITS["max_sequences_per_request"]
    for body in ({"prompt": ["tell me a story"] * 1000, "n": 128, "max_tokens": 1},
                 {"prompt": [[1, 2, 3]] * (limit + 1), "max_tokens": 1},
                 {"prompt": ["a", "b", "c"], "n": 100, "max_tokens": 1}):
        error(post(base, body), 400, "n", "too_many_sequences")
    error(post(base, {"prompt": ["a", "b", "c"], "best_of": 100, "use_beam_search": True, "max_tokens": 1,
                      "temperature": 0}), 400, "n", "too_many_sequences")  # beams count too
    assert len(ex.received) == before  # refused before reaching the executor
    ok = post(base, {"prompt": ["a", "b"], "n": 2, "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


def test_batches_cannot_bypass_the_waiting_queue(tok):
    app, executors, _ = fake_app(tok, max_waiting_sequences=4, executor_kwargs={"first_token_delay_s": 1.0})
    with serve_in_thread(app) as base:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", post(base, {"prompt": "hi", "n": 2,
                                                                              "max_tokens": 2})))
        t.start()
        while not executors[0].received:
            time.sleep(0.005)
        # 2 sequences wait; 3 prompts more would make 5 > 4, as would n=3, all as one request.
        r = post(base, {"prompt": ["a", "b", "c"], "max_tokens": 2})
        error(r, 429, code="queue_full")
        assert int(r.headers["retry-after"]) >= 1
        error(post(base, {"messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 2},
                   "/v1/chat/completions"), 429, code="queue_full")
        assert len(executors[0].received) == 1  # none of the refused prompts was sent
        assert post(base, {"prompt": ["a", "b"], "max_tokens": 2}).status_code == 200  # 2 + 2 fits
        t.join()
        assert first["r"].status_code == 200


def test_the_waiting_queue_has_a_finite_default():
    assert 0 < DEFAULT_LIMITS["max_waiting_sequences"] < 10**5


@pytest.mark.parametrize("body, param", [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * (DEFAULT_LIMITS["max_stop_string_chars"] + 1)}, "stop"),
    ({"priority": -(2**63)}, "priority"),
    ({"priority": DEFAULT_LIMITS["max_abs_priority"] + 1}, "priority"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(DEFAULT_LIMITS["max_logit_bias_entries"] + 1)}}, "logit_bias"),
    ({"max_tokens": 3000}, "max_tokens"),
])
def test_limits_answer_400(server, body, param):
    error(post(server["base"], {"prompt": "hi", **body}), 400, param)
    error(post(server["base"], {"messages": [{"role": "user", "content": "hi"}], **body}, "/v1/chat/completions"),
          400, param)


def test_prompt_over_the_context_is_refused_before_routing(server):
    base, ex, bm = server["base"], server["ex"], server["bm"]
    calls, received = len(bm.calls), len(ex.received)
    error(post(base, {"prompt": [5] * 2100, "max_tokens": 1}), 400, "prompt", "context_length_exceeded")
    assert len(bm.calls) == calls and len(ex.received) == received


def test_limits_within_bounds_are_accepted(server):
    r = post(server["base"], {"prompt": "hi", "max_tokens": 3, "stop": ["w" * 256, "x", "y", "z"],
                              "priority": -1000})
    assert r.status_code == 200, r.text


def test_tiny_temperature_is_sent_as_greedy(server):
    base, ex = server["base"], server["ex"]
    r = post(base, {"prompt": "hi", "max_tokens": 2, "temperature": 1e-300})
    assert r.status_code == 200, r.text
    assert ex.received[-1]["params"]["temperature"] == 0.0
    assert post(base, {"prompt": "hi", "max_tokens": 2, "temperature": 0.5}).status_code == 200
    assert ex.received[-1]["params"]["temperature"] == 0.5


def test_logit_bias_reaches_the_executor(server):
    base, ex = server["base"], server["ex"]
    r = post(base, {"prompt": "hi", "max_tokens": 2, "logit_bias": {"50": -100, "7": 2.5, "007": 1}})
    assert r.status_code == 200, r.text
    assert ex.received[-1]["params"]["logit_bias"] == [[7, 1.0], [50, -100.0]]  # "7" and "007" are one id
    r = post(base, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logit_bias": {"3": 100}},
             "/v1/chat/completions")
    assert r.status_code == 200 and ex.received[-1]["params"]["logit_bias"] == [[3, 100.0]]
    post(base, {"prompt": "hi", "max_tokens": 2})
    assert "logit_bias" not in ex.received[-1]["params"]  # not sent when unused


# ------------------------------------------------------------------------------ stop-string cost
class CharTokenizer:
    """One character per token id (``chr``): decoding costs nothing, so only the matcher counts."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_stop_string_matching_cost_does_not_grow_with_the_output():
    # The adversarial case for a rescanning matcher: long stop strings whose every prefix keeps
    # matching the output ("aaa...a" against stops "aaa...ab"), so text is held back all along.
    stops = ["a" * 255 + "b", "a" * 200 + "c", "ab" * 100 + "x", "a" * 50 + "d"]
    ts = TextStream(CharTokenizer(), stops)
    per_block, released = [], 0
    for block in range(10):
        before = ts.chars_scanned
        for _ in range(1000):
            released += len(ts.push([ord("a")]))
        per_block.append(ts.chars_scanned - before)
        # Only what could still become a stop string is held back.
        assert ts._pending_len <= max(map(len, stops))
    # Each token's work is bounded by its text times the stop strings (amortized), not the output.
    assert max(per_block) <= 2 * 1000 * len(stops)
    assert per_block[-1] <= per_block[1] * 1.05
    assert released == 10_000 - 255 and not ts.stopped
    assert ts.push([ord("b")]) == "" and ts.stopped  # "a"*255 + "b" completes: the text ends before it
    assert ts.text == "a" * (10_000 - 255)


def test_first_completed_stop_string_wins_and_ties_go_to_the_earliest_start():
    ts = TextStream(CharTokenizer(), ["bcd", "abcd", "zz"])
    out = "".join(ts.push([ord(c)]) for c in "xxabcdyy") + ts.finish()
    assert out == "xx" and ts.stopped


# ---------------------------------------------------------------------------- tenant isolation
def cached(base, key, prompt, **extra):
    r = post(base, {"prompt": prompt, "max_tokens": 1, **extra}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_cached_tokens_reveal_nothing_across_tenants(tok):
    app, executors, _ = fake_app(tok, api_keys=["key-a", "key-b"])
    with serve_in_thread(app) as base:
        assert cached(base, "key-a", LONG_PROMPT) == 0
        assert cached(base, "key-b", LONG_PROMPT) == 0  # B learns nothing of A's prompt
        assert cached(base, "key-a", LONG_PROMPT) > 0  # A still shares with itself
        assert cached(base, "key-b", LONG_PROMPT) > 0
        # cache_salt splits a tenant's cache further; the same salt in another tenant shares nothing.
        assert cached(base, "key-a", LONG_PROMPT, cache_salt="s1") == 0
        assert cached(base, "key-a", LONG_PROMPT, cache_salt="s1") > 0
        assert cached(base, "key-b", LONG_PROMPT, cache_salt="s1") == 0
        salts = {m["cache_salt"] for m in executors[0].received}
        assert len(salts) == 4 and not any("key-" in s or s == "s1" for s in salts)  # keys never travel
        assert tenant_of("key-a") != tenant_of("key-b")
        # Routing's prefix lookups are salted the same way: no oracle through the router either.
        r = post(base, {"prompt": LONG_PROMPT, "max_tokens": 1}, headers={"Authorization": "Bearer key-c"})
        error(r, 401)


def test_without_keys_or_with_sharing_the_cache_is_shared(tok):
    app, _, _ = fake_app(tok, api_keys=["key-a", "key-b"], isolate_tenants=False)
    with serve_in_thread(app) as base:
        assert cached(base, "key-a", LONG_PROMPT) == 0
        assert cached(base, "key-b", LONG_PROMPT) > 0


# --------------------------------------------------------------------------------------- metrics
def test_metrics_can_require_the_admin_key(tok):
    app, _, _ = fake_app(tok, admin_key="adm", api_keys=["user-key"], metrics_need_admin=True)
    with serve_in_thread(app) as base:
        error(httpx.get(base + "/metrics"), 401)
        error(httpx.get(base + "/metrics", headers={"Authorization": "Bearer user-key"}), 401)
        error(httpx.get(base + "/admin/cache", headers={"Authorization": "Bearer user-key"}), 401)
        r = httpx.get(base + "/metrics", headers={"Authorization": "Bearer adm"})
        assert r.status_code == 200 and "pagedserve:kv_cache_usage_perc" in r.text


class Untouchable(list):
    """A block table or cache map that fails the test if anything walks it."""

    def __iter__(self):
        raise AssertionError("walked a per-block structure")


def test_metrics_stats_do_not_walk_the_blocks(server):
    bm = BlockManager()
    bm.register("ex", 4096, 16)
    bm.step("ex", admit=[(f"s{i}", list(range(i, i + 600)), 600, None, 0) for i in range(6)])
    ex = bm.executors["ex"]
    full = bm.stats()["ex"]
    assert full["device"]["used"] > 200 and "token_utilization" in full
    for seq in ex.seqs.values():
        seq.block_table = Untouchable(seq.block_table)
    ex.cached_meta = Untouchable()
    summary = bm.stats(summary=True)["ex"]  # would raise if it walked a block table or the cache
    assert summary["device"] == {k: v for k, v in full["device"].items() if k != "cached_free"}
    assert summary["prefix_cache"] == full["prefix_cache"] and summary["preemptions"] == full["preemptions"]
    # And /metrics asks the block manager for that summary.
    server["bm"].calls.clear()
    assert httpx.get(server["base"] + "/metrics").status_code == 200
    assert server["bm"].calls == ["stats"]


# --------------------------------------------------------------------------------- n > 1 siblings
def test_a_choice_answered_on_a_stop_string_stops_decoding_and_its_siblings_go_on(tok):
    texts = [" one two STOP three four five six seven", " alpha beta gamma delta epsilon zeta eta theta",
             " red green blue STOP cyan magenta yellow"]
    replies = [tok.encode(t, add_special_tokens=False) for t in texts]
    app, executors, bm = fake_app(tok, executor_kwargs={"reply": lambda _p, _params, i: replies[i],
                                                        "token_delay_s": 0.01})
    with serve_in_thread(app) as base:
        r = post(base, {"prompt": "hi", "n": 3, "max_tokens": 60, "stop": ["STOP"], "ignore_eos": True})
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == [" one two ", texts[1], " red green blue "]
        rid = r.json()["id"]
        ex = executors[0]
        # Choices 0 and 2 were aborted on their own as soon as their stop string showed.
        assert {(rid, 0), (rid, 2)} <= set(ex.aborted_choices) and (rid, 1) not in ex.aborted_choices
        assert bm.stats()["executor-0"]["device"]["used"] == 0  # every block is back


def test_once_answered_no_sibling_keeps_decoding(tok):
    reply = tok.encode(" x STOP" + " filler" * 200, add_special_tokens=False)
    app, executors, bm = fake_app(tok, executor_kwargs={"reply": lambda _p, _params, i: reply,
                                                        "token_delay_s": 0.01})
    with serve_in_thread(app) as base:
        t0 = time.monotonic()
        r = post(base, {"prompt": "hi", "n": 4, "max_tokens": 200, "stop": ["STOP"], "ignore_eos": True})
        assert r.status_code == 200 and all(c["text"] == " x " for c in r.json()["choices"])
        assert time.monotonic() - t0 < 1.5  # 200 tokens at 10 ms would take 2 s
        assert r.json()["usage"]["completion_tokens"] <= 4 * 4
        assert not executors[0]._running and bm.stats()["executor-0"]["device"]["used"] == 0


def test_flags_set_every_limit_and_several_keys(monkeypatch, capsys):
    from blockmgr.settings import SettingsParser
    from gateway.limits import LIMITS
    from gateway.settings import GatewaySettings

    parser = SettingsParser("pagedserve gateway", "test")
    parser.add(GatewaySettings)

    def build(argv):
        return parser.build(GatewaySettings, parser.parse(argv))

    def limits(settings):
        return {name: getattr(settings, name) for name in LIMITS}

    monkeypatch.setenv("PAGEDSERVE_API_KEY", "k1, k2")
    settings = build([])
    assert limits(settings) == DEFAULT_LIMITS and settings.api_keys == ["k1", "k2"]
    settings = build(["--api-key", "a", "--api-key", "b", "--max-stop-strings", "8",
                      "--min-temperature", "0.001", "--max-waiting-requests", "7"])
    assert settings.api_keys == ["a", "b"]
    assert limits(settings) == {**DEFAULT_LIMITS, "max_stop_strings": 8, "min_temperature": 0.001,
                                "max_waiting_sequences": 7}
    with pytest.raises(SystemExit) as exc:
        build(["--max-abs-priority", "-1"])
    assert exc.value.code == 2 and "--max-abs-priority" in capsys.readouterr().err
