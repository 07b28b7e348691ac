"""Cache inspection and steering against the real block manager: lookup, prefix listing, pins with
TTL and a cap, eviction policies (with a property test of the pool's books under each), and the
CPU tier. Everything goes through the wire protocol (``InProcessBlockManager`` round-trips msgpack)."""

import time

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockmgr.client import BlockManagerRequestError, InProcessBlockManager
from blockmgr.manager import BlockManager
from tests.blockmgr.test_redis_restart import redis_url  # noqa: F401 (a fixture)

BS = 4


def make(num_blocks=16, eviction="lru", num_cpu_blocks=0, cost=None, **kw):
    events = []
    bm = BlockManager(watermark=0, on_events=events.extend, eviction=eviction, **kw)
    client = InProcessBlockManager(bm)
    client.register("ex", num_blocks, BS, num_cpu_blocks, cost)
    return bm, client, events


def run(client, seq, prompt, prio=0, salt=None, ex="ex"):
    """Admit, compute and finish one request, leaving its full blocks cached and free."""
    r = client.step(ex, admit=[[seq, prompt, len(prompt), salt, prio]])
    assert seq in r["admitted"], r
    client.step(ex, grow=[[seq, len(prompt) + 1, [7]]])  # the prompt's K/V is computed now
    client.step(ex, free=[seq])
    return r["admitted"][seq]


def test_lookup_reports_cached_tokens_per_tier_and_salt():
    bm, client, _ = make()
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    assert client.cache_lookup(prompt)["ex"]["cached_tokens"] == 0
    run(client, "a", prompt)
    got = client.cache_lookup(prompt + [1, 2, 3])["ex"]
    assert got["cached_tokens"] == 8 and got["device_tokens"] == 8 and got["cpu_tokens"] == 0
    assert got["pinned_tokens"] == 0 and got["prefix_id"].startswith("ex:")
    assert client.cache_lookup(prompt, cache_salt="other")["ex"]["cached_tokens"] == 0
    assert client.cache_lookup(prompt[:5])["ex"]["cached_tokens"] == 4
    with pytest.raises(BlockManagerRequestError):
        client.cache_lookup([])


def test_prefix_listing_pages_and_counts_hits():
    bm, client, _ = make(num_blocks=32)
    shared = list(range(8))
    run(client, "a", shared + [50, 51, 52, 53, 9])
    run(client, "b", shared + [60, 61, 62, 63, 9])
    run(client, "c", shared + [60, 61, 62, 63, 9])  # hits b's whole chain
    listing = client.cache_prefixes()
    assert listing["total"] == 2
    top, other = listing["prefixes"]
    assert top["hits"] == 1 and other["hits"] == 0
    assert top["partial_hits"] == other["partial_hits"] == 2, "b and c reused the blocks both chains share"
    assert top["num_blocks"] == 3 and top["num_tokens"] == 12 and top["tier"] == "device"
    assert top["first_token_ids"][:12] == shared + [60, 61, 62, 63] and not top["pinned"]
    assert top["last_use"] >= other["last_use"] > 0
    page = client.cache_prefixes(offset=1, limit=1, max_tokens=3)
    assert page["total"] == 2 and [p["id"] for p in page["prefixes"]] == [other["id"]]
    assert page["prefixes"][0]["first_token_ids"] == [0, 1, 2]
    assert client.cache_prefixes(executor_id="nobody")["total"] == 0
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"max_tokens": 5000}):
        with pytest.raises(BlockManagerRequestError):
            client.cache_prefixes(**bad)


def test_pinned_prefix_survives_pressure_and_unpin_releases_it():
    bm, client, events = make(num_blocks=8)
    prompt = list(range(200, 209))  # 2 full blocks
    run(client, "a", prompt)
    (pin,) = client.pin(prompt)
    assert pin["num_blocks"] == 2 and pin["num_tokens"] == 8 and pin["expires_at"] is None
    assert events[-1][:2] == ["BlockPinned", "ex"] and len(events[-1][2]) == 2
    assert client.stats()["ex"]["device"]["used"] == 2, "a pin holds its blocks"
    # Fill the rest of the pool twice over with other prompts: the pinned prefix is never evicted.
    for i in range(4):
        run(client, f"x{i}", [1000 * (i + 1) + j for j in range(17)])
    assert client.cache_lookup(prompt)["ex"]["pinned_tokens"] == 8
    assert run(client, "b", prompt) == 8
    assert client.cache_prefixes()["prefixes"][0]["pinned"] in (True, False)  # listed
    assert any(p["pinned"] for p in client.cache_prefixes()["prefixes"])
    assert client.unpin(pin["pin_id"])["num_blocks"] == 2
    assert events[-1][0] == "BlockUnpinned" and events[-1][4] == "unpinned"
    assert client.stats()["ex"]["device"]["used"] == 0 and client.pins() == []
    with pytest.raises(BlockManagerRequestError) as err:
        client.unpin(pin["pin_id"])
    assert err.value.code == "unknown_pin"


def test_pin_by_prefix_id_and_errors():
    bm, client, _ = make(num_blocks=8)
    run(client, "a", list(range(9)))
    pid = client.cache_prefixes()["prefixes"][0]["id"]
    (pin,) = client.pin(prefix_id=pid)
    assert pin["num_blocks"] == 2
    for kwargs, code in (({"token_ids": [5, 5, 5, 5, 5]}, "not_cached"), ({"prefix_id": "ex:00000000000000ff"}, "not_cached"),
                         ({"prefix_id": "garbage"}, "invalid"), ({}, "invalid"),
                         ({"token_ids": list(range(9)), "ttl_s": -1}, "invalid")):
        with pytest.raises(BlockManagerRequestError) as err:
            client.pin(**kwargs)
        assert err.value.code == code, kwargs


def test_pins_are_capped_at_the_pool_share():
    bm, client, _ = make(num_blocks=8, pin_share=0.5)  # at most 4 pinned blocks
    a, b = list(range(13)), list(range(500, 509))
    run(client, "a", a)  # 3 full blocks
    run(client, "b", b)  # 2 full blocks
    client.pin(a)
    with pytest.raises(BlockManagerRequestError) as err:
        client.pin(b)
    assert err.value.code == "pin_does_not_fit" and "limit of 4" in str(err.value)
    assert len(client.pins()) == 1 and client.stats()["ex"]["device"]["used"] == 3, "a refused pin pins nothing"
    client.pin(a)  # the same blocks again: nothing new is held
    assert client.stats()["ex"]["device"]["used"] == 3


def test_pin_ttl_expires_with_an_event():
    bm, client, events = make()
    run(client, "a", list(range(9)))
    (pin,) = client.pin(list(range(9)), ttl_s=0.05)
    assert pin["expires_at"] == pytest.approx(time.time() + 0.05, abs=0.04)
    time.sleep(0.1)
    client.step("ex")  # any step expires due pins
    assert bm.executors["ex"].pins == {} and client.stats()["ex"]["device"]["used"] == 0
    assert events[-1][0] == "BlockUnpinned" and events[-1][3] == pin["pin_id"] and events[-1][4] == "expired"


def test_pins_survive_snapshot_restore_and_drop_on_new_incarnation():
    bm, client, events = make()
    run(client, "a", list(range(9)))
    (pin,) = client.pin(list(range(9)), ttl_s=3600)
    snap = bm.snapshot("ex")
    bm2 = BlockManager(watermark=0, on_events=events.extend)
    bm2.restore(snap)
    c2 = InProcessBlockManager(bm2)
    assert [p["pin_id"] for p in c2.pins()] == [pin["pin_id"]]
    assert c2.cache_lookup(list(range(9)))["ex"]["pinned_tokens"] == 8
    c2.unpin(pin["pin_id"])
    assert c2.stats()["ex"]["device"]["used"] == 0
    c2.pin(list(range(9)))
    c2.register("ex", 17, BS, 0)  # a different geometry: a new incarnation
    assert c2.pins() == [] and c2.cache_prefixes()["total"] == 0
    assert ["BlockUnpinned", "ex"] == events[-2][:2] and events[-2][4] == "executor_restarted"
    assert events[-1] == ["AllBlocksCleared", "ex"]


def test_eviction_policies_choose_their_victim():
    def evicted_after(eviction, setup):
        bm, client, events = make(num_blocks=16, eviction=eviction)
        for step in setup:
            step(client)
        before = {p["first_token_ids"][0] for p in client.cache_prefixes()["prefixes"]}
        # 3 cached blocks and 13 uncached free ones: taking 14 must evict at least one cached block.
        client.step("ex", admit=[["new", [900] * 56, 56, None, 0]])
        after = {p["first_token_ids"][0] for p in client.cache_prefixes()["prefixes"]}
        return before - after

    a, b, c = [1, 1, 1, 1, 1], [2, 2, 2, 2, 2], [3, 3, 3, 3, 3]  # one full block each (+1 token)

    def hits(client):  # a: cached first, hit twice; b: no hit; c: cached last, hit once
        run(client, "a", a, prio=5)
        run(client, "b", b, prio=0)
        run(client, "c", c, prio=9)
        for i in range(2):
            run(client, f"a{i}", a, prio=5)
        run(client, "c0", c, prio=9)

    assert 2 in evicted_after("lru", [hits]), "b was freed least recently"
    assert evicted_after("lfu", [hits]) == {2}, "b has no hits"
    assert evicted_after("priority", [hits]) == {3}, "c's users are the least important (9)"

    def fresh(client):  # lfu must prefer the unhit block even when it was freed last
        for name, tokens in (("a", a), ("a0", a), ("c", c), ("c0", c), ("b", b)):
            run(client, name, tokens)

    assert 1 in evicted_after("lru", [fresh])
    assert evicted_after("lfu", [fresh]) == {2}


class PolicyMachine(RuleBasedStateMachine):
    """Random admissions, growth, frees, forks, swaps, pins and unpins keep every pool's books
    balanced, and a simulated executor that applies each reply's copies in the executor's order
    (swap-out, swap-in, copy-on-write, then the forward pass writes the granted tokens) always
    finds in each block the tokens the block manager thinks are there: so tier moves, revivals
    from the CPU tier and preemption never hand out a block whose contents are wrong."""

    eviction = "lru"

    def __init__(self):
        super().__init__()
        self.events = []
        self.bm = BlockManager(watermark=0, eviction=self.eviction, on_events=self.events.extend, pin_share=0.5)
        self.client = InProcessBlockManager(self.bm)
        cost = {"bytes_per_block": 1, "copy_bandwidth": 1e9, "flops_per_token": 1e9, "flops_per_s": 1e9}
        self.client.register("ex", 12, BS, 6, cost)
        self.ex = self.bm.executors["ex"]
        self.n = 0
        self.dev, self.cpu = {}, {}  # simulated KV: block -> {position in block: token}
        self.written = {}  # seq -> tokens whose K/V the simulated executor has written

    def _step(self, **lists):
        r = self.client.step("ex", **lists)
        for d, c in r["swap_out"]:
            self.cpu[c] = dict(self.dev.get(d, {}))
        for c, d in r["swap_in"]:
            self.dev[d] = dict(self.cpu.get(c, {}))
        for src, dst in r["copies"]:
            self.dev[dst] = dict(self.dev.get(src, {}))
        for parent, child in lists.get("fork", ()):
            self.written[child] = self.written[parent]
        for seq_id in list(self.written):
            if seq_id not in self.ex.seqs:
                del self.written[seq_id]
        for seq_id, n in r["admitted"].items():
            self.written[seq_id] = n
        for seq in self.ex.seqs.values():
            if seq.swapped:
                continue
            for pos in range(self.written[seq.seq_id], seq.num_tokens):
                self.dev.setdefault(seq.block_table[pos // BS], {})[pos % BS] = seq.tokens[pos]
            self.written[seq.seq_id] = seq.num_tokens
        return r

    def _running(self):
        return sorted(s for s, q in self.ex.seqs.items() if not q.swapped)

    @rule(n=st.integers(1, 14), family=st.integers(0, 3), prio=st.integers(0, 3))
    def admit(self, n, family, prio):
        self.n += 1
        self._step(admit=[[f"s{self.n}", [family * 100 + i for i in range(n)], n, None, prio]])

    @precondition(lambda self: self._running())
    @rule(data=st.data(), extra=st.integers(1, 6))
    def grow(self, data, extra):
        seq = self.ex.seqs[data.draw(st.sampled_from(self._running()))]
        self._step(grow=[[seq.seq_id, seq.num_tokens + extra, [seq.num_tokens + i for i in range(extra)]]])

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def fork(self, data):
        self.n += 1
        self._step(fork=[[data.draw(st.sampled_from(self._running())), f"s{self.n}"]])

    @precondition(lambda self: self.ex.seqs)
    @rule(data=st.data())
    def free(self, data):
        self._step(free=[data.draw(st.sampled_from(sorted(self.ex.seqs)))])

    @precondition(lambda self: any(q.swapped for q in self.ex.seqs.values()))
    @rule(data=st.data())
    def swap_in(self, data):
        self._step(swap_in=[data.draw(st.sampled_from(sorted(s for s, q in self.ex.seqs.items() if q.swapped)))])

    @rule(family=st.integers(0, 3), ttl=st.sampled_from([None, 3600.0]))
    def pin(self, family, ttl):
        try:
            self.client.pin([family * 100 + i for i in range(14)], ttl_s=ttl)
        except BlockManagerRequestError as exc:
            assert exc.code in ("not_cached", "pin_does_not_fit")

    @precondition(lambda self: self.ex.pins)
    @rule(data=st.data())
    def unpin(self, data):
        self.client.unpin(data.draw(st.sampled_from(sorted(self.ex.pins))))

    @rule()
    def reset(self):
        self.client.reset_prefix_cache()

    @invariant()
    def books_balance(self):
        ex = self.ex
        for pool, table in ((ex.device, "block_table"), (ex.cpu, "cpu_table")):
            held = {}
            for seq in ex.seqs.values():
                for b in getattr(seq, table):
                    held[b] = held.get(b, 0) + 1
            if pool is ex.device:
                for rec in ex.pins.values():
                    for b in rec["blocks"]:
                        held[b] = held.get(b, 0) + 1
            for b in range(pool.num_blocks):
                assert pool.refcount[b] == held.get(b, 0), "refcount == tables and pins holding it"
                assert pool.is_free(b) == (held.get(b, 0) == 0)
            assert sum(1 for _ in pool.free_blocks_lru()) == pool.num_free
            if pool.evictor is not None:
                assert len(pool.evictor) == pool.num_free and all(b in pool.evictor for b in pool.free_blocks_lru())
        assert len({b for rec in ex.pins.values() for b in rec["blocks"]}) <= 6, "pins stay under the cap"
        for rec in ex.pins.values():
            assert [ex.cached_meta[b][0] for b in rec["blocks"]] == rec["hashes"], "pinned blocks keep their prefix"
        for h, b in ex.cache.items():
            assert ex.cached_meta[b][0] == h
        for h, b in ex.cpu_cache.items():
            assert ex.cpu_meta[b][0] == h and ex.cpu.is_free(b) and h not in ex.cache
        assert set(ex.use) <= set(ex.cache) | set(ex.cpu_cache), "no use record outlives its prefix"

    @invariant()
    def blocks_hold_what_the_books_say(self):
        ex = self.ex
        for b, (_, _, tokens) in ex.cached_meta.items():
            assert [self.dev.get(b, {}).get(i) for i in range(BS)] == list(tokens), "a device-cached block"
        for c, (_, _, tokens) in ex.cpu_meta.items():
            assert [self.cpu.get(c, {}).get(i) for i in range(BS)] == list(tokens), "a CPU-tier block"
        for seq in ex.seqs.values():
            table, kv = (seq.cpu_table, self.cpu) if seq.swapped else (seq.block_table, self.dev)
            for pos in range(self.written.get(seq.seq_id, seq.num_tokens)):
                assert kv.get(table[pos // BS], {}).get(pos % BS) == seq.tokens[pos], "a sequence's K/V"

    def teardown(self):
        for pin_id in list(self.ex.pins):
            self.client.unpin(pin_id)
        self.client.step("ex", free=list(self.ex.seqs))
        assert self.ex.device.num_used == 0 and self.ex.cpu.num_used == 0


class LfuMachine(PolicyMachine):
    eviction = "lfu"


class PriorityMachine(PolicyMachine):
    eviction = "priority"


_PROPERTY = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestLruBooks = PolicyMachine.TestCase
TestLfuBooks = LfuMachine.TestCase
TestPriorityBooks = PriorityMachine.TestCase
for _case in (TestLruBooks, TestLfuBooks, TestPriorityBooks):
    _case.settings = _PROPERTY


SWAP_CHEAP = {"bytes_per_block": 1, "copy_bandwidth": 1e9, "flops_per_token": 1e9, "flops_per_s": 1e9}
RECOMPUTE_CHEAP = {"bytes_per_block": 10**9, "copy_bandwidth": 1.0, "flops_per_token": 1, "flops_per_s": 1e9}


def test_evicted_prefix_moves_to_cpu_and_a_hit_swaps_it_back():
    bm, client, events = make(num_blocks=4, num_cpu_blocks=4, cost=SWAP_CHEAP)
    prompt = list(range(300, 309))  # 2 full blocks
    run(client, "a", prompt)
    device_blocks = {bm.executors["ex"].cache[h] for h in bm.executors["ex"].cache}
    r = client.step("ex", admit=[["filler", [5] * 16, 16, None, 0]])  # takes the whole pool
    moved = [ev for ev in events if ev[0] == "BlockMoved"]
    assert moved and moved[-1][3:] == ["device", "cpu"] and len(moved[-1][2]) == 2
    assert {d for d, _ in r["swap_out"]} == device_blocks, "the evicted prefix blocks are copied out"
    got = client.cache_lookup(prompt)["ex"]
    assert got["cpu_tokens"] == 8 and got["device_tokens"] == 0
    assert client.match_prefix(prompt)["ex"] == 8, "routing counts the CPU tier as cached"
    assert [p["tier"] for p in client.cache_prefixes()["prefixes"]] == ["cpu"]
    assert client.block_map()["ex"]["cpu"].count("c") == 2
    cpu_blocks = {c for _, c in r["swap_out"]}
    client.step("ex", free=["filler"])
    n_events = len(events)
    r = client.step("ex", admit=[["b", prompt, len(prompt), None, 0]])
    assert r["admitted"]["b"] == 8, "the CPU tier counts as cached"
    assert {c for c, _ in r["swap_in"]} == cpu_blocks
    assert [d for _, d in r["swap_in"]] == r["updates"]["b"][1][:2], "swapped into b's first blocks"
    back = [ev for ev in events[n_events:] if ev[0] == "BlockMoved" and ev[3:] == ["cpu", "device"]]
    assert len(back) == 1 and sorted(back[0][2]) == sorted(moved[-1][2])
    got = client.cache_lookup(prompt)["ex"]
    assert got["device_tokens"] == 8 and got["cpu_tokens"] == 0
    assert client.stats()["ex"]["cpu_tier"]["in_blocks"] == 2  # (the filler's blocks moved out too)
    assert client.stats()["ex"]["cpu"]["used"] == 0, "CPU-tier blocks stay free for preemption"


def test_no_cpu_tier_when_recompute_is_cheaper_or_there_is_no_cpu_pool():
    for cost, cpu in ((RECOMPUTE_CHEAP, 4), (SWAP_CHEAP, 0)):
        bm, client, events = make(num_blocks=4, num_cpu_blocks=cpu, cost=cost)
        run(client, "a", list(range(9)))
        r = client.step("ex", admit=[["filler", [5] * 16, 16, None, 0]])
        assert r["swap_out"] == [] and not any(ev[0] == "BlockMoved" for ev in events)
        assert client.cache_lookup(list(range(9)))["ex"]["cached_tokens"] == 0


def test_preemption_claims_cpu_tier_blocks():
    bm, client, events = make(num_blocks=4, num_cpu_blocks=2, cost=SWAP_CHEAP)
    run(client, "a", list(range(9)))
    client.step("ex", admit=[["f", [5] * 16, 16, None, 0]])
    assert client.stats()["ex"]["cpu"]["cached_free"] == 2
    client.step("ex", free=["f"])
    client.step("ex", admit=[["old", [1] * 4, 4, None, 0]])
    client.step("ex", admit=[["new", [2] * 4, 4, None, 0]])
    client.step("ex", admit=[["x", [3] * 8, 8, None, 5]])  # fills the device pool
    r = client.step("ex", grow=[["old", 5, [1]]])
    assert "swap" in r["preempted"].values()
    ex = bm.executors["ex"]
    assert len(ex.cpu_meta) < 2 and any(ev[0] == "BlockRemoved" for ev in events)


def test_pins_survive_a_block_manager_restart_from_redis(redis_url, free_port):
    """The service with --eviction lfu --pin-share 0.25 and Redis: pin, kill it, start it again."""
    import signal
    import subprocess
    import sys

    from blockmgr.client import BlockManagerClient

    addr = f"tcp://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "blockmgr", "--bind", addr, "--redis-url", redis_url, "--eviction", "lfu",
            "--pin-share", "0.25", "--log-level", "WARNING", "--insecure-local"]
    proc = subprocess.Popen(argv)
    client = BlockManagerClient(addr, timeout_s=20)
    try:
        client.register("ex", 16, BS, 0)
        run(client, "a", list(range(9)))  # 2 full blocks
        run(client, "b", list(range(50, 63)))  # 3 full blocks
        (pin,) = client.pin(list(range(9)), ttl_s=3600)
        with pytest.raises(BlockManagerRequestError) as err:
            client.pin(list(range(50, 63)))  # 2 + 3 > 16 * 0.25
        assert err.value.code == "pin_does_not_fit"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = subprocess.Popen(argv)
        assert [p["pin_id"] for p in client.pins()] == [pin["pin_id"]]
        assert client.cache_lookup(list(range(9)))["ex"]["pinned_tokens"] == 8
        assert client.stats()["ex"]["device"]["used"] == 2
        client.unpin(pin["pin_id"])
        assert client.stats()["ex"]["device"]["used"] == 0
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
