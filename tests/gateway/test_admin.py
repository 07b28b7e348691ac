"""Admin endpoints, Prometheus metrics, disconnect aborts and prefix-aware routing, with fake executors."""

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.routing import choose
from tests.gateway.fakes import fake_app, serve_in_thread

LONG = "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends of worms. " * 3


@pytest.fixture(scope="module")
def server(tok):
    app, executors, bm = fake_app(tok, num_executors=2, executor_kwargs={"token_delay_s": 0.02})
    with serve_in_thread(app) as base:
        yield {"base": base, "ex": executors, "bm": bm}


def used_blocks(base) -> int:
    return sum(ex["device"]["used"] for ex in httpx.get(base + "/admin/cache").json()["executors"].values())


def wait_blocks_free(base, within_s: float) -> float:
    t0 = time.monotonic()
    while used_blocks(base) != 0:
        assert time.monotonic() - t0 < within_s, httpx.get(base + "/admin/cache").json()
        time.sleep(0.02)
    return time.monotonic() - t0


def background(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    return t, out


def test_streamed_disconnect_aborts_every_child_and_frees_blocks(server):
    base = server["base"]
    body = {"prompt": "Tell me a story", "max_tokens": 500, "n": 3, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(8)]
        assert all(line.startswith("data: ") or line == "" for line in got)
        assert used_blocks(base) > 0
        rid = next(line for line in got if line.startswith("data: ")).split('"id":"')[1].split('"')[0]
    assert wait_blocks_free(base, 1.0) < 1.0
    assert any(rid in ex.aborted for ex in server["ex"])


def test_non_streamed_disconnect_aborts_too(server):
    base = server["base"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", timeout=0.5, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500, "n": 2, "ignore_eos": True})
    wait_blocks_free(base, 1.0)


def test_sequences_and_reset(server):
    base = server["base"]
    t, out = background(lambda: httpx.post(base + "/v1/completions", timeout=30, json={
        "prompt": LONG, "max_tokens": 40, "n": 2, "ignore_eos": True}))
    deadline = time.monotonic() + 5
    while not (seqs := httpx.get(base + "/admin/sequences").json()["sequences"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    s = seqs[0]
    assert s["state"] == "running" and s["executor_id"] in ("executor-0", "executor-1")
    assert s["num_prompt_tokens"] > 16 and s["num_blocks"] >= 2
    detail = httpx.get(base + f"/admin/sequences/{s['request_id']}").json()
    assert detail["executor_id"] == s["executor_id"] and len(detail["sequences"]) == 2
    assert all(b["tier"] == "device" and b["refcount"] >= 1 for b in detail["sequences"][0]["blocks"])
    busy = httpx.post(base + "/admin/cache/reset")
    assert busy.status_code == 409 and busy.json()["reset"] is False and "in use" in busy.json()["message"]
    t.join()
    assert out["r"].status_code == 200
    assert httpx.get(base + f"/admin/sequences/{s['request_id']}").status_code == 404
    done = httpx.post(base + "/admin/cache/reset")
    assert done.status_code == 200 and done.json()["reset"] is True
    one = httpx.post(base + "/admin/cache/reset", params={"executor_id": s["executor_id"]})
    assert one.status_code == 200 and one.json()["reset"] is True
    unknown = httpx.post(base + "/admin/cache/reset", params={"executor_id": "executor-9"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "executor_not_found"


def test_admin_executors(server):
    exs = httpx.get(server["base"] + "/admin/executors").json()["executors"]
    assert [e["executor_id"] for e in exs] == ["executor-0", "executor-1"]
    for e in exs:
        assert e["healthy"] and e["device"] == "cpu" and e["num_blocks"] == 256 and e["block_size"] == 16
        assert e["async_scheduling"] is True
        assert {"num_running", "num_waiting", "num_swapped", "in_flight", "model", "max_model_len"} <= set(e)


def test_routing_follows_the_cached_prefix(server):
    base = server["base"]
    r = httpx.post(base + "/v1/completions", json={"prompt": LONG, "max_tokens": 2}).json()
    first = next(ex for ex in server["ex"] if any(m["request_id"] == r["id"] for m in ex.received))
    for suffix in (" And then?", " What next?", " The end."):
        r = httpx.post(base + "/v1/completions", json={"prompt": LONG + suffix, "max_tokens": 2}).json()
        assert any(m["request_id"] == r["id"] for m in first.received)
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    # A different cache_salt shares nothing, so it is routed by load.
    r = httpx.post(base + "/v1/completions", json={"prompt": LONG, "max_tokens": 2, "cache_salt": "other"}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_misses_are_spread_by_load(server):
    base = server["base"]
    threads = [background(lambda i=i: httpx.post(base + "/v1/completions", timeout=30, json={
        "prompt": f"unrelated prompt number {i}", "max_tokens": 20, "ignore_eos": True})) for i in range(2)]
    for t, _ in threads:
        t.join()
    ids = [out["r"].json()["id"] for _, out in threads]
    owners = {ex.executor_id for ex in server["ex"] for m in ex.received if m["request_id"] in ids}
    assert owners == {"executor-0", "executor-1"}


def test_choose_prefers_cache_then_load():
    class H:
        def __init__(self, eid, load):
            self.executor_id, self.load = eid, load

    a, b, c = H("a", 5), H("b", 0), H("c", 0)
    assert choose([a, b, c], {"a": 32, "b": 16}) is a
    assert choose([a, b, c], {}) is b
    assert choose([a, b, c], {}, turn=2) is c  # ties go round-robin
    assert choose([a, b, c], {"b": 16, "c": 16}, turn=2) is c


EXPECTED_METRICS = {
    "pagedserve:kv_cache_usage_perc": "gauge",
    "pagedserve:prefix_cache_queries": "counter",
    "pagedserve:prefix_cache_hits": "counter",
    "pagedserve:num_preemptions": "counter",
    "pagedserve:num_requests_running": "gauge",
    "pagedserve:num_requests_waiting": "gauge",
    "pagedserve:num_requests_swapped": "gauge",
    "pagedserve:prompt_tokens": "counter",
    "pagedserve:generation_tokens": "counter",
    "pagedserve:time_to_first_token_seconds": "histogram",
    "pagedserve:inter_token_latency_seconds": "histogram",
    "pagedserve:e2e_request_latency_seconds": "histogram",
}


def test_metrics(server):
    base = server["base"]
    httpx.post(base + "/v1/completions", json={"prompt": "count me", "max_tokens": 5, "ignore_eos": True})
    r = httpx.get(base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name, kind in EXPECTED_METRICS.items():
        assert families[name].type == kind, name
    for name in ("pagedserve:prefix_cache_queries_total", "pagedserve:num_preemptions_total{",
                 "pagedserve:prompt_tokens_total{", "pagedserve:generation_tokens_total{",
                 "pagedserve:time_to_first_token_seconds_bucket{", "pagedserve:e2e_request_latency_seconds_count{"):
        assert name in r.text, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("pagedserve:generation_tokens_total", (("model_name", "fake-model"),))] >= 5
    assert samples[("pagedserve:e2e_request_latency_seconds_count", (("model_name", "fake-model"),))] >= 1
    kinds = {s.labels["kind"] for s in families["pagedserve:num_preemptions"].samples}
    assert kinds == {"swap", "recompute"}
    usage = [s.value for s in families["pagedserve:kv_cache_usage_perc"].samples]
    assert len(usage) == 2 and all(0 <= u <= 1 for u in usage)
