"""Durable state: kill the block-manager process mid-generation and restart it from Redis."""

import shutil
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from blockmgr import security
from blockmgr.client import BlockManagerClient, InProcessBlockManager
from blockmgr.manager import BlockManager
from executor.engine import Engine, EngineConfig
from executor.request import SamplingParams
from executor.server import connect_block_manager
from tests.conftest import _free_port


@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed (apt-get install redis-server; .ci/run does it)"
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack") / "keys"
    security.create_keys(d, ["blockmgr", "gateway", "executor-0", "ex"])
    return d


def start_blockmgr(addr, redis_url, keys_dir, events=None):
    argv = [sys.executable, "-m", "blockmgr", "--bind", addr, "--redis-url", redis_url, "--log-level", "WARNING",
            "--keys-dir", str(keys_dir)]
    if events:
        argv += ["--kv-events-bind", events]
    return subprocess.Popen(argv)


def test_restart_from_redis_mid_generation(smollm, redis_url, keys_dir):
    model, tok = smollm
    prompts = [tok.encode(t) for t in ("The capital of France is", "def add(a, b):",
                                       "A short poem about autumn leaves:", "1, 1, 2, 3, 5, 8,")]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    config = EngineConfig(block_size=4, num_blocks=64, num_cpu_blocks=0)
    reference = Engine(model, InProcessBlockManager(BlockManager()), config, {tok.eos_token_id}).generate(prompts, params)

    addr = f"tcp://127.0.0.1:{_free_port()}"
    proc = start_blockmgr(addr, redis_url, keys_dir)
    try:
        bm = connect_block_manager(addr, "executor-0", 64, 4, keys=security.Keys(keys_dir, "executor-0"))
        engine = Engine(model, bm, config, {tok.eos_token_id})
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        outs = {f"r{i}": [] for i in range(len(prompts))}
        for _ in range(6):
            for o in engine.step():
                outs[o.request_id] += o.new_token_ids
        assert all(0 < len(v) < 16 for v in outs.values()), "killed mid-generation"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start_blockmgr(addr, redis_url, keys_dir)  # the executor keeps running meanwhile
        while engine.has_work():
            for o in engine.step():
                outs[o.request_id] += o.new_token_ids
        assert [outs[f"r{i}"] for i in range(len(prompts))] == reference
        stats = BlockManagerClient(addr, keys=security.Keys(keys_dir, "gateway")).stats()["executor-0"]
        assert stats["device"]["used"] == 0 and stats["prefix_cache"]["cached_blocks"] > 0
    finally:
        proc.kill()
        proc.wait(10)


def test_kv_events_mirror_the_prefix_cache(redis_url, keys_dir):
    addr, events_addr = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    proc = start_blockmgr(addr, redis_url, keys_dir, events_addr)
    sub = zmq.Context.instance().socket(zmq.SUB)
    security.Keys(keys_dir, "gateway").connect(sub, "blockmgr")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(events_addr)
    try:
        client = BlockManagerClient(addr, timeout_s=10, keys=security.Keys(keys_dir, "ex"))
        client.ping()
        time.sleep(0.3)  # let the subscription reach the publisher
        client.register("ex", 4, 4)
        client.step("ex", step_id=1, admit=[("a", list(range(9)), 9, None, 0)])
        client.step("ex", step_id=2, free=["a"])
        client.step("ex", step_id=3, admit=[("b", [7] * 16, 16, None, 0)])  # evicts both cached blocks
        mirror, batches = set(), []
        while sub.poll(2000) and len(batches) < 2:
            ts, events = msgpack.unpackb(sub.recv(), raw=False)
            assert abs(ts - time.time()) < 60
            batches.append(events)
            for ev in events:
                if ev[0] == "BlockStored":
                    assert ev[1] == "ex" and ev[5] == 4 and ev[4] == list(range(8))
                    mirror.update(ev[2])
                elif ev[0] == "BlockRemoved":
                    mirror.difference_update(ev[2])
        assert [ev[0] for b in batches for ev in b] == ["BlockStored", "BlockRemoved"]
        assert mirror == set()
    finally:
        sub.close()
        proc.kill()
        proc.wait(10)
