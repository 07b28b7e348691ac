"""Redis as a step log: snapshot + replay rebuilds the state; Redis going away stops nothing."""

import shutil
import subprocess
import threading
import time

import pytest
import redis

from blockmgr import protocol
from blockmgr.client import BlockManagerClient, InProcessBlockManager
from blockmgr.manager import BlockManager
from blockmgr.persistence import KEY_PREFIX, LOG_PREFIX, RedisStore
from blockmgr.server import handle
from executor.engine import Engine, EngineConfig
from executor.request import SamplingParams
from executor.server import connect_block_manager
from tests.conftest import _free_port
from blockmgr import security
from tests.blockmgr.test_redis_restart import keys_dir, start_blockmgr  # noqa: F401 (keys_dir: a fixture)

BS = 4
SWAP_CHEAP = {"bytes_per_block": 1, "copy_bandwidth": 1e9, "flops_per_token": 1e9, "flops_per_s": 1e9}


class RedisServer:
    """A redis-server on a fixed port that a test can kill and start again."""

    def __init__(self, tmp_path):
        self.exe = shutil.which("redis-server")
        assert self.exe, "redis-server is not installed (apt-get install redis-server)"
        self.port, self.dir, self.proc = _free_port(), tmp_path, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                time.sleep(0.025)
        raise AssertionError("redis-server did not start")

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def apply(manager, store, message):
    """What the service does with one request: apply it, then make it durable."""
    payload = protocol.encode(message)
    reply = handle(manager, protocol.decode(payload))
    assert reply["ok"], reply
    reply["durable"] = store.record(manager, message, payload)
    # Compaction runs in the background; waiting here makes each test's log deterministic.
    # (test_a_step_never_waits_for_compaction shows steps do not wait in the service.)
    assert store.wait_compacted(10)
    return reply


def workload(manager, store, steps=30):
    """Admissions, decodes, forks (copy-on-write), swaps, frees and a prefix-cache reset."""
    apply(manager, store, {"op": "register", "executor_id": "ex", "num_device_blocks": 10, "block_size": BS,
                           "num_cpu_blocks": 8, "cost": SWAP_CHEAP, "incarnation": "i1"})
    tokens = {}
    for k in range(steps):
        msg = {"op": "step", "executor_id": "ex", "step_id": k + 1, "incarnation": "i1"}
        if k % 4 == 0:
            sid = f"s{k}"
            tokens[sid] = [k % 3] * 6
            msg["admit"] = [[sid, tokens[sid], 6, None, k % 2]]
        else:
            ex = manager.executors["ex"]
            running = sorted(s for s, q in ex.seqs.items() if not q.swapped)
            msg["grow"] = [[s, ex.seqs[s].num_tokens + 1, [k]] for s in running]
            swapped = sorted(s for s, q in ex.seqs.items() if q.swapped)
            if k % 7 == 3 and running:
                msg["fork"] = [[running[0], f"c{k}"]]
                msg["grow"].append([f"c{k}", ex.seqs[running[0]].num_tokens + 1, [k + 1]])
            if k % 4 == 2 and len(running) > 2:
                msg["free"] = [running[-1]]
                msg["grow"] = [g for g in msg["grow"] if g[0] != running[-1]]
            if swapped:
                msg["swap_in"] = swapped[:1]
        apply(manager, store, msg)
        if k == 17:
            apply(manager, store, {"op": "reset_prefix_cache", "executor_id": None})


class _Huge(dict):
    def get(self, key, default=None):
        return 1 << 60

    def __setitem__(self, key, value):
        pass


def state(manager):
    snap = manager.snapshot("ex")
    snap.pop("saved_at")
    # A cached block's last use is wall-clock time: a replay stamps its own. What eviction reads
    # from it is the order of uses, which a replay must keep: compare ranks, not seconds.
    order = sorted(u[2] for u in snap["use"])
    snap["use"] = [[h, hits, order.index(t), prio] for h, hits, t, prio in snap["use"]]
    return snap


def test_each_step_appends_one_small_record_and_snapshot_plus_replay_rebuilds_the_state(redis_server):
    manager = BlockManager(watermark=0)
    store = RedisStore(redis_server.url, compact_every=10_000)
    workload(manager, store)
    r = redis.Redis.from_url(redis_server.url)
    records = r.lrange(LOG_PREFIX + "ex", 0, -1)
    assert 0 < len(records) == store.log_len["ex"] < 31
    assert sum(map(len, records)) == store.log_bytes["ex"] < store.snapshot_bytes["ex"] == \
        len(r.get(KEY_PREFIX + "ex")), "a log as large as the snapshot was compacted"
    stats = manager.stats()["ex"]
    assert stats["preemptions"]["swap"] > 0 and stats["copy_on_write"] > 0, "the workload swapped and forked"
    restored = BlockManager(watermark=0)
    assert RedisStore(redis_server.url).load(restored) == 1
    assert state(restored) == state(manager)
    assert restored.stats() == manager.stats()


def test_a_step_record_does_not_grow_with_the_pool(redis_server):
    store = RedisStore(redis_server.url)
    sizes = []
    for num_blocks in (64, 64 * 1024):
        manager = BlockManager(watermark=0)
        apply(manager, store, {"op": "register", "executor_id": "ex", "num_device_blocks": num_blocks,
                               "block_size": BS})
        apply(manager, store, {"op": "step", "executor_id": "ex", "step_id": 1,
                               "admit": [[f"s{i}", [i] * 30, 30, None, 0] for i in range(8)]})
        apply(manager, store, {"op": "step", "executor_id": "ex", "step_id": 2,
                               "grow": [[f"s{i}", 31, [7]] for i in range(8)]})
        sizes.append((store.log_bytes["ex"], store.snapshot_bytes["ex"]))
    (small_log, small_snap), (big_log, big_snap) = sizes
    assert big_snap > 100 * small_snap and big_log == small_log, "O(what the step changed), not O(pool)"


def test_compaction_replaces_the_log_with_a_snapshot(redis_server):
    manager = BlockManager(watermark=0)
    store = RedisStore(redis_server.url, compact_every=4)
    store.snapshot_bytes = _Huge()  # only the record cap compacts
    workload(manager, store)
    r = redis.Redis.from_url(redis_server.url)
    assert r.llen(LOG_PREFIX + "ex") == (31 % 4) and r.exists(KEY_PREFIX + "ex")
    restored = BlockManager(watermark=0)
    RedisStore(redis_server.url).load(restored)
    assert state(restored) == state(manager)


def test_a_step_never_waits_for_compaction_and_redis_is_consistent_at_every_point(redis_server):
    manager = BlockManager(watermark=0)
    store = RedisStore(redis_server.url, compact_every=3)
    store.snapshot_bytes = _Huge()  # only the record cap compacts
    gate = threading.Event()
    write = store._write_compaction
    store._write_compaction = lambda job: gate.wait(30) and write(job)  # a compaction that takes "forever"
    r = redis.Redis.from_url(redis_server.url)

    def step(k):
        message = {"op": "step", "executor_id": "ex", "step_id": k, "incarnation": "i1",
                   "admit": [[f"s{k}", [k] * 6, 6, None, 0]]}
        payload = protocol.encode(message)
        assert handle(manager, protocol.decode(payload))["ok"]
        t0 = time.monotonic()
        assert store.record(manager, message, payload)
        return time.monotonic() - t0

    def restored_state():
        restored = BlockManager(watermark=0)
        assert RedisStore(redis_server.url).load(restored) == 1
        return state(restored)

    apply(manager, store, {"op": "register", "executor_id": "ex", "num_device_blocks": 64, "block_size": BS,
                           "incarnation": "i1"})
    took = [step(k) for k in range(1, 9)]
    assert max(took) < 1.0, "steps went on while the compaction (due at record 3) was held"
    # Held before its transaction: the old snapshot and every record, which replay to the state.
    assert r.llen(LOG_PREFIX + "ex") == 8 and restored_state() == state(manager)
    gate.set()
    assert store.wait_compacted(10)
    # Written: the snapshot of record 3 and the 5 records after it (appended while it was held).
    assert r.llen(LOG_PREFIX + "ex") == 5 and restored_state() == state(manager)
    step(9)  # 6 records no snapshot covers: compacted at once now
    assert store.wait_compacted(10) and r.llen(LOG_PREFIX + "ex") == 0 and restored_state() == state(manager)

    # An inline full snapshot voids a compaction still queued: it must not trim records it never saw.
    gate.clear()
    for k in range(10, 13):
        step(k)  # the third queues a compaction, held
    assert store.record_snapshot(manager)  # empties the log
    step(13)
    gate.set()
    assert store.wait_compacted(10)
    assert r.llen(LOG_PREFIX + "ex") == 1 and restored_state() == state(manager)
    store.close()


def test_redis_down_serves_from_memory_says_so_and_writes_a_snapshot_when_back(redis_server):
    manager = BlockManager(watermark=0)
    store = RedisStore(redis_server.url, retry_every_s=0.0, timeout_s=0.5)
    workload(manager, store, steps=10)
    redis_server.kill()
    reply = apply(manager, store, {"op": "step", "executor_id": "ex", "step_id": 11, "incarnation": "i1",
                                   "admit": [["late", [9] * 5, 5, None, 0]]})
    assert reply["durable"] is False and reply["admitted"] == {"late": 0}, "applied and answered anyway"
    status = manager.stats()["ex"]["persistence"]
    assert status["ok"] is False and "Error" in status["error"] and status["changes_not_durable"] == 1
    redis_server.start()  # empty: everything it held is gone too
    assert store.heal(manager)
    assert manager.stats()["ex"]["persistence"]["ok"] is True
    restored = BlockManager(watermark=0)
    RedisStore(redis_server.url).load(restored)
    assert state(restored) == state(manager), "the full snapshot written on return holds every change"


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_executor_keeps_generating_while_redis_is_down(smollm, redis_server, keys_dir):
    model, tok = smollm
    prompts = [tok.encode("The capital of France is"), tok.encode("def add(a, b):")]
    config = EngineConfig(block_size=BS, num_blocks=64)
    reference = Engine(model, InProcessBlockManager(BlockManager()), config, {tok.eos_token_id}).generate(
        prompts, GREEDY)
    addr = f"tcp://127.0.0.1:{_free_port()}"
    proc = start_blockmgr(addr, redis_server.url, keys_dir)
    try:
        engine = Engine(model, connect_block_manager(addr, "executor-0", 64, BS, keys=security.Keys(keys_dir, "executor-0")), config, {tok.eos_token_id})
        outs = {"a": [], "b": []}
        engine.add_request("a", prompts[0], GREEDY)
        engine.add_request("b", prompts[1], GREEDY)
        for _ in range(4):
            for o in engine.step():
                outs[o.request_id] += o.new_token_ids
        redis_server.kill()
        for _ in range(4):
            for o in engine.step():
                outs[o.request_id] += o.new_token_ids
        stats = BlockManagerClient(addr, keys=security.Keys(keys_dir, "gateway")).stats()["executor-0"]
        assert stats["persistence"]["ok"] is False and stats["persistence"]["changes_not_durable"] >= 4
        redis_server.start()
        while engine.has_work():
            for o in engine.step():
                outs[o.request_id] += o.new_token_ids
        assert [outs["a"], outs["b"]] == reference
        deadline = time.monotonic() + 10
        while not BlockManagerClient(addr, keys=security.Keys(keys_dir, "gateway")).stats()["executor-0"]["persistence"]["ok"]:
            assert time.monotonic() < deadline, "the block manager did not notice Redis was back"
            time.sleep(0.1)
        restored = BlockManager()
        RedisStore(redis_server.url).load(restored)
        assert restored.stats()["executor-0"]["device"]["used"] == 0
        assert restored.executors["executor-0"].incarnation == engine.incarnation
    finally:
        proc.kill()
        proc.wait(10)


def test_gateway_metric_reports_persistence_health():
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics("m")
    metrics.update({"a": {"persistence": {"ok": True}}, "b": {"persistence": {"ok": False}}, "c": {}}, {})
    family = next(f for f in text_string_to_metric_families(metrics.render().decode())
                  if f.name == "pagedserve:blockmgr_persistence_ok")
    assert {s.labels["executor"]: s.value for s in family.samples} == {"a": 1.0, "b": 0.0}


def test_a_deferred_snapshot_packed_in_slices_is_the_same_bytes_and_a_true_copy():
    """The compaction copies the prefix-cache maps shallowly on the step path and builds and packs
    their rows later, a slice at a time (so the step thread keeps the GIL): same bytes as packing
    the plain snapshot, and steps applied in between do not leak into it."""
    import msgpack

    from blockmgr.persistence import pack_in_slices

    bm = BlockManager()
    bm.register("ex", num_device_blocks=64, block_size=BS, num_cpu_blocks=8)
    prompt = list(range(40))
    bm.step("ex", admit=[("a", prompt, len(prompt), None, 0)])
    bm.step("ex", free=["a"])
    bm.step("ex", admit=[("b", prompt + [7], len(prompt) + 1, None, 0)])  # hits a's cached blocks
    plain_snapshot = bm.snapshot("ex")
    plain = msgpack.packb(plain_snapshot, use_bin_type=True)
    deferred = {**bm.snapshot("ex", deferred=True), "saved_at": plain_snapshot["saved_at"]}
    assert len(deferred["cached"]) == len(prompt) // BS and len(deferred["use"]) > 0
    bm.step("ex", admit=[("c", list(range(100, 140)), 40, None, 0)])  # changes the live maps
    bm.step("ex", free=["b"])
    for slice_items in (1, 3, 2048):
        assert pack_in_slices(deferred, slice_items) == plain
    nested = {"x": [[1, list(range(10))], (2, list(range(5)))], "y": list(range(7)), "z": {}}
    assert pack_in_slices(nested, 3) == msgpack.packb(nested, use_bin_type=True)
    restored = BlockManager()
    restored.restore(msgpack.unpackb(plain, raw=False, strict_map_key=False))
    assert restored.snapshot("ex")["use"] == msgpack.unpackb(plain, raw=False, strict_map_key=False)["use"]
