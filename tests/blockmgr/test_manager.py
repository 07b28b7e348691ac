"""Block manager: pools, block tables, prefix cache, copy-on-write, preemption, the ZMQ service."""

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockmgr import protocol
from blockmgr.block_hash import hash_block, hash_chain
from blockmgr.block_pool import BlockPool, OutOfBlocks
from blockmgr.client import BlockManagerRequestError, InProcessBlockManager
from blockmgr.manager import BlockManager, BlockManagerError

BS = 4


def admit(bm, seq, prompt, n=None, salt=None, prio=0, ex="ex"):
    return bm.step(ex, admit=[(seq, prompt, n or len(prompt), salt, prio)])


def test_pool_allocates_lru_and_refuses_when_empty():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2] and pool.num_free == 1
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    assert pool.num_free == 1, "a refused allocation takes nothing"
    pool.decref(1)
    pool.decref(0)
    assert list(pool.free_blocks_lru()) == [3, 1, 0], "least recently freed first"
    pool.take(1)  # O(1) removal from the middle of the queue
    assert list(pool.free_blocks_lru()) == [3, 0]
    with pytest.raises(ValueError, match="double free"):
        pool.decref(3)
    assert list(BlockPool.restore(pool.snapshot()).free_blocks_lru()) == [3, 0]


def test_block_hash_is_chained_and_salted():
    a = hash_chain([1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[1] == hash_block(a[0], [5, 6, 7, 8])
    assert hash_chain([9, 9, 9, 9, 5, 6, 7, 8], 4)[1] != a[1], "same block, other parent"
    assert hash_chain([1, 2, 3, 4], 4, ("salt",)) != a[:1]
    assert all(0 <= h < 2**64 for h in a)


def test_step_admits_grows_and_frees():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=10, block_size=BS)
    r = bm.step("ex", admit=[("a", [1] * 7, 5, None, 0), ("b", [2] * 4, 4, None, 0)])
    assert r["updates"] == {"a": [0, [0, 1]], "b": [0, [2]]} and r["admitted"] == {"a": 0, "b": 0}
    r = bm.step("ex", grow=[("a", 7, [1, 1]), ("b", 5, [9])])
    assert r["updates"] == {"b": [1, [3]]}, "a still fits in its 2 blocks"
    assert bm.stats()["ex"]["device"]["used"] == 4
    bm.step("ex", free=["a", "b"])
    assert bm.stats()["ex"]["device"]["used"] == 0


def test_unsatisfiable_admissions_are_denied_not_crashed():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=3, block_size=BS)
    r = bm.step("ex", admit=[("a", [1] * 8, 8, None, 0), ("b", [2] * 8, 8, None, 0), ("huge", [3] * 100, 4, None, 0)])
    assert r["updates"] == {"a": [0, [0, 1]]}
    assert r["denied"] == {"b": "no_space", "huge": "never_fits"}
    assert bm.stats()["ex"]["device"]["used"] == 2, "a denied sequence holds nothing"
    with pytest.raises(BlockManagerRequestError, match="unknown executor"):
        bm.step("nope", free=["a"])
    with pytest.raises(BlockManagerRequestError, match="freed in the same step"):
        bm.step("ex", free=["a"], grow=[("a", 9, [1])])
    assert bm.stats()["ex"]["device"]["used"] == 2, "a refused step changes nothing, its free included"


def test_watermark_holds_back_admissions_but_not_growth():
    bm = InProcessBlockManager(BlockManager(watermark=0.2))
    bm.register("ex", num_device_blocks=10, block_size=1)  # watermark = 2 blocks
    assert admit(bm, "a", [1] * 8)["updates"]
    assert admit(bm, "b", [1])["denied"] == {"b": "no_space"}, "admission would dip under the watermark"
    assert bm.step("ex", grow=[("a", 10, [1, 1])])["updates"] == {"a": [8, [8, 9]]}


def test_prefix_cache_hit_reuses_computed_blocks_and_keeps_last_token():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=16, block_size=BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    admit(bm, "a", prompt)
    r = admit(bm, "b", prompt)
    assert r["admitted"] == {"b": 0}, "a's blocks are not computed until a's next step"
    bm.step("ex", grow=[("a", 11, [42])])  # a's prompt is computed now: published
    bm.step("ex", free=["b"])  # b's identical blocks are computed too, but a's are already cached
    r = admit(bm, "c", prompt)
    assert r["admitted"] == {"c": 8}
    a_table = bm.sequence("ex", "a")["blocks"]
    assert r["updates"]["c"][1][:2] == [a_table[0]["block"], a_table[1]["block"]]
    assert [b["refcount"] for b in bm.sequence("ex", "c")["blocks"]] == [2, 2, 1]
    # A full hit still computes the last token: 8 tokens of 8 cached.
    r = admit(bm, "d", prompt[:8])
    assert r["admitted"] == {"d": 4}
    r = admit(bm, "e", prompt, salt="other-tenant")
    assert r["admitted"] == {"e": 0}, "a different cache_salt never shares blocks"
    s = bm.stats()["ex"]["prefix_cache"]
    assert s["hits_blocks"] == 3 and s["hits_tokens"] == 12


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    events = []
    mgr = BlockManager(watermark=0, on_events=lambda ev: events.extend(ev))
    bm = InProcessBlockManager(mgr)
    bm.register("ex", num_device_blocks=4, block_size=BS)
    admit(bm, "a", list(range(8)) + [99])
    bm.step("ex", free=["a"])
    assert bm.stats()["ex"]["device"]["cached_free"] == 2
    assert events[0][0] == "BlockStored" and events[0][4] == list(range(8))
    assert admit(bm, "b", list(range(8)) + [7])["admitted"] == {"b": 8}, "revived from the free queue"
    bm.step("ex", free=["b"])
    r = admit(bm, "c", [50] * 16)  # needs every block: evicts the cached ones
    assert r["admitted"] == {"c": 0}
    assert bm.stats()["ex"]["evictions"] == 2
    assert events[-1][0] == "BlockRemoved" and len(events[-1][2]) == 2


def test_reset_prefix_cache_is_honest():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=8, block_size=BS)
    admit(bm, "a", list(range(9)))
    admit(bm, "b", list(range(100, 109)))
    bm.step("ex", free=["a"], grow=[("b", 10, [1])])
    r = bm.reset_prefix_cache()
    assert r["reset"] is False and r["dropped_blocks"] == 2 and r["blocks_in_use"] == 2
    bm.step("ex", free=["b"])
    r = bm.reset_prefix_cache()
    assert r["reset"] is True and r["dropped_blocks"] == 2
    assert admit(bm, "c", list(range(100, 109)))["admitted"] == {"c": 0}


def test_fork_shares_blocks_and_copy_on_write_on_append():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=16, block_size=BS)
    admit(bm, "p", list(range(6)))  # blocks: [full, half]
    r = bm.step("ex", fork=[("p", "c1"), ("p", "c2")], grow=[("p", 7, [100]), ("c1", 7, [101])])
    p_blocks = [b["block"] for b in bm.sequence("ex", "p")["blocks"]]
    c1_blocks = [b["block"] for b in bm.sequence("ex", "c1")["blocks"]]
    c2_blocks = [b["block"] for b in bm.sequence("ex", "c2")["blocks"]]
    assert p_blocks[0] == c1_blocks[0] == c2_blocks[0], "the full block stays shared"
    assert len({p_blocks[1], c1_blocks[1], c2_blocks[1]}) == 3, "each writer got its own copy"
    assert sorted(r["copies"]) == sorted([[c2_blocks[1], p_blocks[1]], [c2_blocks[1], c1_blocks[1]]])
    r = bm.step("ex", grow=[("c2", 7, [102])])
    assert r["copies"] == [], "the last holder writes in place"
    assert bm.stats()["ex"]["copy_on_write"] == 2


# A pool geometry where moving a block to CPU memory costs less than recomputing it.
SWAP_CHEAP = {"bytes_per_block": 1, "copy_bandwidth": 1e9, "flops_per_token": 1e9, "flops_per_s": 1e9}


def test_preemption_swaps_or_recomputes_by_cost():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=4, block_size=BS, num_cpu_blocks=8, cost=SWAP_CHEAP)
    admit(bm, "old", [1] * 8)
    admit(bm, "new", [2] * 8)
    r = bm.step("ex", grow=[("old", 9, [1])])
    assert r["preempted"] == {"new": "swap"}
    # The victim's 2 blocks, then the cached prefix block that old's new block evicted, which
    # moves to the CPU tier (blockmgr.cpu_tier) as copying it back beats recomputing it.
    assert len(r["swap_out"]) == 3 and bm.stats()["ex"]["cpu_tier"]["out_blocks"] == 1
    assert r["updates"]["old"][0] == 2
    assert bm.stats()["ex"]["num_swapped"] == 1
    bm.step("ex", free=["old"])
    r = bm.step("ex", swap_in=["new"])
    assert r["swapped_in"] == ["new"] and len(r["swap_in"]) == 2
    # Now make recompute cheaper: the victim is dropped.
    bm.register("ex2", num_device_blocks=4, block_size=BS, num_cpu_blocks=8,
                cost={"bytes_per_block": 10**9, "copy_bandwidth": 1.0, "flops_per_token": 1, "flops_per_s": 1e9})
    admit(bm, "old", [1] * 8, ex="ex2")
    admit(bm, "new", [2] * 8, ex="ex2")
    r = bm.step("ex2", grow=[("old", 9, [1])])
    assert r["preempted"] == {"new": "recompute"}
    st_ = bm.stats()["ex2"]
    assert st_["preemptions"] == {"swap": 0, "recompute": 1} and st_["num_seqs"] == 1


def test_lowest_priority_then_latest_arrival_is_preempted_first():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=3, block_size=BS)
    admit(bm, "a", [1] * 4, prio=0)
    admit(bm, "b", [2] * 4, prio=5)  # least important
    admit(bm, "c", [3] * 4, prio=0)
    r = bm.step("ex", grow=[("a", 5, [1]), ("c", 5, [1])])
    # b goes first (lowest priority); then c must grow with nothing free, and c arrived after a,
    # so c yields rather than a.
    assert r["preempted"] == {"b": "recompute", "c": "recompute"}
    assert set(r["updates"]) == {"a"}


def test_retried_step_is_not_applied_twice():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=8, block_size=BS)
    r1 = bm.step("ex", step_id=1, admit=[("a", [1] * 5, 5, None, 0)])
    r2 = bm.step("ex", step_id=1, admit=[("a", [1] * 5, 5, None, 0)])
    assert r1 == r2 and bm.stats()["ex"]["device"]["used"] == 2


def check_books(ex) -> None:
    """An executor's pools balance: refcount == references from block tables, none both free and used."""
    for pool, table in ((ex.device, "block_table"), (ex.cpu, "cpu_table")):
        held = {}
        for seq in ex.seqs.values():
            for b in getattr(seq, table):
                held[b] = held.get(b, 0) + 1
        for b in range(pool.num_blocks):
            assert pool.refcount[b] == held.get(b, 0), "refcount == number of tables holding it"
            assert pool.is_free(b) == (held.get(b, 0) == 0), "no block is both free and used"
        assert pool.num_free + pool.num_used == pool.num_blocks
        assert sum(1 for _ in pool.free_blocks_lru()) == pool.num_free
    for seq in ex.seqs.values():
        assert len(seq.block_table if not seq.swapped else seq.cpu_table) == -(-seq.num_tokens // ex.block_size)
    for h, b in ex.cache.items():
        assert ex.cached_meta[b][0] == h


def check_op_groups(reply) -> None:
    """Each group of a step's ops can run as one parallel launch: no block written twice, and (for
    device-to-device copies) none both read and written."""
    for kind, pairs in reply["ops"]:
        dsts = [d for _, d in pairs]
        assert len(set(dsts)) == len(dsts), f"a {kind} group writes a block twice: {pairs}"
        if kind == "copy":
            assert not set(dsts) & {s for s, _ in pairs}, f"a copy group reads a block it writes: {pairs}"


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / swap / reset keep every pool's books balanced."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(watermark=0)
        cost = {"bytes_per_block": 1, "copy_bandwidth": 1e9, "flops_per_token": 1e9, "flops_per_s": 1e9}
        self.bm.register("ex", num_device_blocks=12, block_size=BS, num_cpu_blocks=6, cost=cost)
        self.ex = self.bm.executors["ex"]
        self.next_id = 0
        self.contents = {}  # seq -> tokens it owns, to check copy-on-write isolation

    def _apply(self, reply):
        check_op_groups(reply)
        for seq_id, kind in reply["preempted"].items():
            if kind == "recompute":
                self.contents.pop(seq_id, None)

    def _running(self):
        return sorted(s for s, q in self.ex.seqs.items() if not q.swapped)

    @rule(n=st.integers(1, 20), shared=st.booleans())
    def allocate(self, n, shared):
        seq = f"s{self.next_id}"
        self.next_id += 1
        prompt = list(range(n)) if shared else [self.next_id * 100 + i for i in range(n)]
        r = self.bm.step("ex", admit=[(seq, prompt, n, None, 0)])
        check_op_groups(r)
        if seq in r["admitted"]:
            self.contents[seq] = list(prompt)

    @precondition(lambda self: self._running())
    @rule(data=st.data(), extra=st.integers(1, 6), pending=st.integers(0, 2))
    def append(self, data, extra, pending):
        seq_id = data.draw(st.sampled_from(self._running()))
        seq = self.ex.seqs[seq_id]
        others = {s: list(q.tokens) for s, q in self.ex.seqs.items() if s != seq_id}
        # Ids from the first position the block manager lacks (it may hold pending ones), the
        # last `pending` of them not sampled yet (pipelined scheduling).
        ids = [seq.num_tokens * 7 + i for i in range(seq.num_tokens + extra - seq.num_known)]
        ids[len(ids) - min(pending, extra):] = [protocol.PENDING] * min(pending, extra)
        r = self.bm.step("ex", grow=[(seq_id, seq.num_tokens + extra, ids)])
        self._apply(r)
        for s, toks in others.items():
            if s in self.ex.seqs:
                assert self.ex.seqs[s].tokens == toks, "a write never changes another sequence"
        if seq_id in self.ex.seqs and seq_id not in r["preempted"]:
            self.contents[seq_id] = list(self.ex.seqs[seq_id].tokens)

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self._running()))
        child = f"s{self.next_id}"
        self.next_id += 1
        if self.ex.seqs[parent].num_known < self.ex.seqs[parent].num_tokens:
            with pytest.raises(BlockManagerError, match="pending"):  # the child would share the owed slot
                self.bm.step("ex", fork=[(parent, child)])
            return
        check_op_groups(self.bm.step("ex", fork=[(parent, child)]))

    @precondition(lambda self: self.ex.seqs)
    @rule(data=st.data())
    def free(self, data):
        check_op_groups(self.bm.step("ex", free=[data.draw(st.sampled_from(sorted(self.ex.seqs)))]))

    @precondition(lambda self: any(q.swapped for q in self.ex.seqs.values()))
    @rule(data=st.data())
    def swap_in(self, data):
        seq_id = data.draw(st.sampled_from(sorted(s for s, q in self.ex.seqs.items() if q.swapped)))
        check_op_groups(self.bm.step("ex", swap_in=[seq_id]))

    @rule()
    def reset(self):
        r = self.bm.reset_prefix_cache()
        assert r["reset"] == (r["blocks_in_use"] == 0)

    @invariant()
    def books_balance(self):
        check_books(self.ex)

    @invariant()
    def no_pending_id_is_hashed(self):
        for meta in (self.ex.cached_meta, self.ex.cpu_meta):
            assert all(protocol.PENDING not in tokens for _, _, tokens in meta.values())
        for q in self.ex.seqs.values():
            assert len(q.block_hashes) <= q.num_known // BS

    def teardown(self):
        self.bm.step("ex", free=list(self.ex.seqs))
        assert self.ex.device.num_used == 0 and self.ex.cpu.num_used == 0, "all freed: nothing in use"


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


def test_service_over_zmq_answers_and_survives_garbage(blockmgr_service):
    import zmq

    client, addr = blockmgr_service, blockmgr_service.address
    client.register("ex", 8, 16)
    r = client.step("ex", admit=[("a", list(range(17)), 17, None, 0)])
    assert r["updates"] == {"a": [0, [0, 1]]}
    assert [b["refcount"] for b in client.sequence("ex", "a")["blocks"]] == [1, 1]
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(addr)
    raw.send_multipart([b"", b"\xc1not msgpack"])
    assert raw.poll(5000)
    assert "undecodable" in protocol.decode(raw.recv_multipart()[-1])["error"]
    raw.send_multipart([b"", protocol.encode({"op": "step", "executor_id": "ex", "grow": [["a", "x", []]]})])
    assert raw.poll(5000)
    assert "malformed" in protocol.decode(raw.recv_multipart()[-1])["error"]
    raw.close()
    with pytest.raises(BlockManagerRequestError, match="unknown op"):
        client._checked({"op": "frobnicate"})
    assert client.match_prefix(list(range(17))) == {"ex": 0}
    client.step("ex", free=["a"])
    assert client.match_prefix(list(range(17))) == {"ex": 16}
    assert client.stats()["ex"]["device"]["used"] == 0


def test_op_groups_split_where_a_parallel_launch_would_race():
    from blockmgr.manager import _StepReply

    r = _StepReply()
    r.add_ops("swap_out", [[13, 4], [8, 1]])
    r.add_ops("swap_out", [[7, 5], [3, 4]])  # CPU block 4 again: a new group, run after the first
    r.add_ops("copy", [[1, 2], [2, 3]])  # reads block 2 after a write of it
    r.add_ops("copy", [[5, 6], [7, 5]])  # writes block 5 after a read of it
    assert r.ops == [["swap_out", [[13, 4], [8, 1], [7, 5]]], ["swap_out", [[3, 4]]],
                     ["copy", [[1, 2]]], ["copy", [[2, 3], [5, 6]]], ["copy", [[7, 5]]]]
    assert r.swap_out == [[13, 4], [8, 1], [7, 5], [3, 4]] and len(r.copies) == 4
    assert "group_io" not in r.to_dict()


def test_pending_ids_are_settled_by_the_next_grow_and_hashed_only_then():
    """Pipelined scheduling: a decode's grow goes out before its token is sampled (PENDING), and
    the next grow gives the id; a block with a pending id enters the prefix cache only after."""
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=8, block_size=BS)
    admit(bm, "a", [1, 2, 3])
    bm.step("ex", grow=[("a", 4, [protocol.PENDING])])
    seq = bm.manager.executors["ex"].seqs["a"]
    assert seq.tokens == [1, 2, 3, protocol.PENDING] and seq.num_known == 3
    bm.step("ex", grow=[("a", 5, [7, protocol.PENDING])])  # block 0 is full and known before hashing
    assert seq.tokens == [1, 2, 3, 7, protocol.PENDING]
    assert bm.match_prefix([1, 2, 3, 7, 9]) == {"ex": 4}
    assert bm.match_prefix([1, 2, 3, 8, 9]) == {"ex": 0}
    bm.step("ex", grow=[("a", 6, [5, 6])])  # an unpipelined grow settles and appends
    assert seq.tokens == [1, 2, 3, 7, 5, 6] and seq.num_known == 6


def test_a_grow_that_contradicts_the_pending_ids_is_refused_whole():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=8, block_size=BS)
    admit(bm, "a", [1, 2, 3])
    bm.step("ex", grow=[("a", 5, [4, protocol.PENDING])])
    before = list(bm.manager.executors["ex"].seqs["a"].tokens)
    for grow, why in (
        (("a", 6, [protocol.PENDING, 6]), "pending id"),  # a pending id before a known one
        (("a", 4, []), "fewer than"),  # the count would shrink below what it holds
        (("a", 6, [5]), "known tokens"),  # 4 known + 1 id is not 6
    ):
        with pytest.raises(BlockManagerRequestError, match=why):
            bm.step("ex", grow=[grow])
    assert bm.manager.executors["ex"].seqs["a"].tokens == before
    with pytest.raises(BlockManagerRequestError):
        bm.step("ex", grow=[("a", 6, [-2, 6])])  # ids below PENDING are malformed on the wire


def test_a_freed_sequence_gives_its_pending_ids_first_and_cannot_be_forked_before():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=8, block_size=BS)
    admit(bm, "a", [1, 2, 3])
    bm.step("ex", grow=[("a", 4, [protocol.PENDING])])
    with pytest.raises(BlockManagerRequestError, match="pending"):
        bm.step("ex", fork=[("a", "child")])  # child and parent would each give the shared slot's id
    with pytest.raises(BlockManagerRequestError, match="freed in the same step"):
        bm.step("ex", free=["a"], grow=[("a", 5, [4, 5])])  # a freed sequence does not grow
    bm.step("ex", free=["a"], grow=[("a", 4, [4])])  # its last id, then the free publishes the block
    assert bm.match_prefix([1, 2, 3, 4, 9]) == {"ex": 4}
    assert bm.stats()["ex"]["device"]["used"] == 0


def test_a_victim_swapped_out_before_its_own_grow_keeps_the_ids_that_entry_settles():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=4, block_size=BS, num_cpu_blocks=8, cost=SWAP_CHEAP)
    admit(bm, "old", [1] * 7)
    admit(bm, "new", [2] * 7)
    bm.step("ex", grow=[("old", 8, [protocol.PENDING]), ("new", 8, [protocol.PENDING])])
    # old's next token needs a block; the pool is full, so new is swapped out before its entry.
    r = bm.step("ex", grow=[("old", 9, [1, protocol.PENDING]), ("new", 9, [3, protocol.PENDING])])
    assert r["preempted"] == {"new": "swap"} and "new" not in r["updates"]
    new = bm.manager.executors["ex"].seqs["new"]
    assert new.tokens == [2] * 7 + [3], "the settled id is kept, the step's pending slot is not"
    bm.step("ex", free=["old"])
    assert bm.step("ex", swap_in=["new"])["swapped_in"] == ["new"]
    bm.step("ex", grow=[("new", 9, [4])])
    assert new.tokens == [2] * 7 + [3, 4]
