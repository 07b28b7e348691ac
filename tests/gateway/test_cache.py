"""The cache admin API over real HTTP, with the real block manager behind the gateway.

Fake executors take their blocks from a real :class:`~blockmgr.manager.BlockManager`
(``tests/gateway/fakes.py``), so a request sent to the gateway really admits, grows, frees and
publishes blocks there.
"""

import httpx
import pytest

from blockmgr.manager import BlockManager
from tests.gateway.fakes import fake_app, serve_in_thread

BS = 16  # the fake executors' block size

LONG = "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends of worms. " * 3


@pytest.fixture(scope="module")
def server(tok):
    app, _, bm = fake_app(tok, num_executors=2, executor_kwargs={"num_blocks": 64},
                          manager=BlockManager(watermark=0, pin_share=0.5))
    with serve_in_thread(app) as base:
        yield {"base": base, "bm": bm}


def complete(base, prompt, **kw):
    r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, **kw}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_lookup_after_a_request_by_text_ids_and_messages(server, tok):
    base = server["base"]
    prompt = LONG + "lookup"
    ids = tok.encode(prompt)
    before = httpx.post(base + "/admin/cache/lookup", json={"prompt": prompt}).json()
    assert before["num_tokens"] == len(ids)
    assert all(e["cached_tokens"] == 0 for e in before["executors"].values())
    complete(base, prompt)
    after = httpx.post(base + "/admin/cache/lookup", json={"prompt": ids}).json()["executors"]
    holder = max(after, key=lambda e: after[e]["cached_tokens"])
    assert after[holder]["cached_tokens"] == len(ids) // BS * BS == after[holder]["device_tokens"]
    assert httpx.post(base + "/admin/cache/lookup",
                      json={"prompt": prompt, "cache_salt": "tenant-b"}).json()["executors"][holder]["cached_tokens"] == 0
    chat = httpx.post(base + "/admin/cache/lookup", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["num_tokens"] > 3
    for bad in ({}, {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, {"prompt": ""}, {"prompt": []},
                {"prompt": [10**9]}, {"prompt": "x", "cache_salt": ""}):
        r = httpx.post(base + "/admin/cache/lookup", json=bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)


def test_prefix_listing_shows_text_hits_and_pages(server, tok):
    base = server["base"]
    prompt = "Listing test. " + LONG
    complete(base, prompt)
    complete(base, prompt)  # a hit on the same executor (prefix-aware routing)
    listing = httpx.get(base + "/admin/cache/prefixes", params={"limit": 1000, "max_tokens": 8}).json()
    mine = [p for p in listing["prefixes"] if p["text"].startswith("Listing test.")]
    assert len(mine) == 1 and mine[0]["hits"] >= 1 and mine[0]["tier"] == "device"
    assert mine[0]["num_tokens"] == mine[0]["num_blocks"] * BS and len(mine[0]["first_token_ids"]) == 8
    assert listing["total"] >= len(listing["prefixes"]) >= 1
    page = httpx.get(base + "/admin/cache/prefixes", params={"offset": 0, "limit": 1}).json()
    assert len(page["prefixes"]) == 1 and page["limit"] == 1
    assert httpx.get(base + "/admin/cache/prefixes", params={"limit": 0}).status_code == 400
    assert httpx.get(base + "/admin/cache/prefixes", params={"limit": 5000}).status_code == 400


def test_pin_unpin_ttl_and_the_cap_over_http(server, tok):
    base = server["base"]
    prompt = "Pin me. " + LONG
    assert httpx.post(base + "/admin/cache/pin", json={"prompt": prompt}).status_code == 404  # not cached yet
    complete(base, prompt)
    r = httpx.post(base + "/admin/cache/pin", json={"prompt": prompt, "ttl_s": 600})
    assert r.status_code == 200, r.text
    (pin,) = r.json()["pins"]
    assert pin["num_tokens"] == len(tok.encode(prompt)) // BS * BS and pin["expires_at"] is not None
    pins = httpx.get(base + "/admin/cache/pins").json()["pins"]
    assert pin["pin_id"] in [p["pin_id"] for p in pins]
    look = httpx.post(base + "/admin/cache/lookup", json={"prompt": prompt}).json()["executors"][pin["executor_id"]]
    assert look["pinned_tokens"] == pin["num_tokens"]
    blocks = httpx.get(base + "/admin/cache/blocks").json()["executors"][pin["executor_id"]]["device"]
    assert blocks.count("p") == pin["num_blocks"]
    assert httpx.delete(base + f"/admin/cache/pin/{pin['pin_id']}").json()["num_blocks"] == pin["num_blocks"]
    assert httpx.delete(base + f"/admin/cache/pin/{pin['pin_id']}").status_code == 404
    for bad in ({"prompt": prompt, "ttl_s": 0}, {"prompt": prompt, "prefix_id": "ex:0000000000000000"},
                {"prefix_id": "nonsense"}):
        r = httpx.post(base + "/admin/cache/pin", json=bad)
        assert r.status_code == 400, (bad, r.text)


def test_a_pin_over_the_share_is_409(tok):
    app, _, bm = fake_app(tok, executor_kwargs={"num_blocks": 16},
                          manager=BlockManager(watermark=0, pin_share=0.25))  # at most 4 pinned blocks
    with serve_in_thread(app) as base:
        prompt = "Too big to pin. " + LONG  # more than 4 full blocks
        complete(base, prompt)
        r = httpx.post(base + "/admin/cache/pin", json={"prompt": prompt})
        assert r.status_code == 409 and r.json()["error"]["code"] == "pin_does_not_fit", r.text
        assert httpx.get(base + "/admin/cache/pins").json()["pins"] == []


def test_new_endpoints_are_in_the_openapi_schema(server):
    paths = httpx.get(server["base"] + "/openapi.json").json()["paths"]
    for path, method in (("/admin/cache/lookup", "post"), ("/admin/cache/prefixes", "get"),
                         ("/admin/cache/pin", "post"), ("/admin/cache/pin/{pin_id}", "delete"),
                         ("/admin/cache/pins", "get"), ("/admin/cache/blocks", "get")):
        assert method in paths[path], path
