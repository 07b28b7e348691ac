"""Block manager: pools, block tables, the batched step, the service over ZeroMQ."""

import threading

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockmgr.block_pool import BlockPool, OutOfBlocks
from blockmgr.client import BlockManagerClient, BlockManagerRequestError, InProcessBlockManager
from blockmgr.manager import BlockManager
from blockmgr.server import serve


def test_pool_allocates_lru_and_refuses_when_empty():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 1
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    assert pool.num_free == 1, "a refused allocation takes nothing"
    pool.decref(1)
    pool.decref(0)
    # Free queue order: 3 (never used), then 1, then 0 (least recently freed first).
    assert list(pool.free_blocks_lru()) == [3, 1, 0]
    with pytest.raises(ValueError, match="double free"):
        pool.decref(3)


def test_step_grows_tables_in_one_batch_and_frees():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=10, block_size=4)
    r = bm.step("ex", [], [("a", 5), ("b", 4)])
    assert r["updates"] == {"a": [0, [0, 1]], "b": [0, [2]]}
    r = bm.step("ex", [], [("a", 8), ("b", 5)])
    assert r["updates"] == {"b": [1, [3]]}, "a still fits in its 2 blocks"
    assert bm.stats()["ex"]["device"] == {"total": 10, "free": 6, "used": 4}
    r = bm.step("ex", ["a", "b"], [])
    assert bm.stats()["ex"]["device"]["used"] == 0


def test_unsatisfiable_growth_is_denied_not_crashed():
    bm = InProcessBlockManager(BlockManager(watermark=0))
    bm.register("ex", num_device_blocks=3, block_size=4)
    r = bm.step("ex", [], [("a", 8), ("b", 8), ("huge", 100)])
    assert r["updates"] == {"a": [0, [0, 1]]}
    assert r["denied"] == {"b": "no_space", "huge": "never_fits"}
    assert bm.stats()["ex"]["device"]["used"] == 2, "a denied sequence holds nothing"
    with pytest.raises(BlockManagerRequestError, match="unknown executor"):
        bm.step("nope", [], [("a", 1)])


def test_watermark_holds_back_admissions_but_not_growth():
    bm = InProcessBlockManager(BlockManager(watermark=0.2))
    bm.register("ex", num_device_blocks=10, block_size=1)  # watermark = 2 blocks
    assert bm.step("ex", [], [("a", 8)])["updates"]
    assert bm.step("ex", [], [("b", 1)])["denied"] == {"b": "no_space"}, "admission would dip under the watermark"
    assert bm.step("ex", [], [("a", 10)])["updates"] == {"a": [8, [8, 9]]}, "running sequences may use it"


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / grow / free sequences keep the pool's books balanced."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(watermark=0)
        self.bm.register("ex", num_device_blocks=16, block_size=4)
        self.ex = self.bm.executors["ex"]
        self.next_id = 0

    @rule(n=st.integers(1, 30))
    def allocate(self, n):
        self.bm.step("ex", [], [(f"s{self.next_id}", n)])
        self.next_id += 1

    @precondition(lambda self: self.ex.seqs)
    @rule(data=st.data(), extra=st.integers(0, 12))
    def grow(self, data, extra):
        seq_id = data.draw(st.sampled_from(sorted(self.ex.seqs)))
        seq = self.ex.seqs[seq_id]
        before = list(seq.block_table)
        self.bm.step("ex", [], [(seq_id, seq.num_tokens + extra)])
        assert seq.block_table[: len(before)] == before, "growth never moves existing blocks"

    @precondition(lambda self: self.ex.seqs)
    @rule(data=st.data())
    def free(self, data):
        self.bm.step("ex", [data.draw(st.sampled_from(sorted(self.ex.seqs)))], [])

    @invariant()
    def books_balance(self):
        pool = self.ex.device
        held = {}
        for seq in self.ex.seqs.values():
            assert len(seq.block_table) * 4 >= seq.num_tokens
            for b in seq.block_table:
                held[b] = held.get(b, 0) + 1
        for b in range(pool.num_blocks):
            assert pool.refcount[b] == held.get(b, 0)
            assert pool.is_free(b) == (held.get(b, 0) == 0), "no block is both free and used"
        assert pool.num_free + pool.num_used == pool.num_blocks
        assert sum(1 for _ in pool.free_blocks_lru()) == pool.num_free

    def teardown(self):
        self.bm.step("ex", list(self.ex.seqs), [])
        assert self.ex.device.num_used == 0, "once every sequence is freed no block is in use"


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@pytest.fixture
def service(free_port):
    addr = f"tcp://127.0.0.1:{free_port()}"
    t = threading.Thread(target=serve, args=(addr,), daemon=True)
    # serve() installs signal handlers, which only the main thread may do: patch them away.
    import blockmgr.server as server_mod

    orig = server_mod.signal.signal
    server_mod.signal.signal = lambda *a: None
    t.start()
    client = BlockManagerClient(addr, timeout_s=5)
    client.ping()
    yield client, addr
    server_mod.signal.signal = orig
    client.close()


def test_service_over_zmq_answers_and_survives_garbage(service):
    client, addr = service
    client.register("ex", 8, 16)
    r = client.step("ex", [], [("a", 17)])
    assert r["updates"] == {"a": [0, [0, 1]]}
    assert client.sequence("ex", "a")["blocks"] == [
        {"block": 0, "refcount": 1, "tier": "device"}, {"block": 1, "refcount": 1, "tier": "device"}]
    import zmq

    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(addr)
    raw.send_multipart([b"", b"\xc1not msgpack"])
    assert raw.poll(5000)
    from blockmgr import protocol

    assert "undecodable" in protocol.decode(raw.recv_multipart()[-1])["error"]
    raw.send_multipart([b"", protocol.encode({"op": "step", "executor_id": "ex"  , "grow": [["a", "x"]]})])
    assert raw.poll(5000)
    assert "malformed" in protocol.decode(raw.recv_multipart()[-1])["error"]
    raw.close()
    with pytest.raises(BlockManagerRequestError, match="unknown op"):
        client._checked({"op": "frobnicate"})
    client.step("ex", ["a"], [])
    assert client.stats()["ex"]["device"]["used"] == 0
