"""The CPU tier of the prefix cache with the real model: a prefix evicted from the device pool is
swapped back in on its next hit, gives the same greedy output, and its time to first token (TTFT)
beats recomputing it. Prints TTFT cold vs warm-from-CPU vs device hit."""

import statistics
import time

from blockmgr.client import InProcessBlockManager
from blockmgr.manager import BlockManager
from executor.engine import Engine, EngineConfig
from executor.request import SamplingParams

BS = 16
FIRST = SamplingParams(max_tokens=1, temperature=0)


def first_token(engine, rid, prompt, salt=None):
    """(seconds to the first token, that token); then runs the engine until it is idle."""
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, FIRST, cache_salt=salt)
    token, ttft = None, None
    while engine.has_work():
        for out in engine.step():
            assert not out.error, out.error
            if out.request_id == rid and out.new_token_ids and ttft is None:
                ttft, token = time.perf_counter() - t0, out.new_token_ids[0]
    return ttft, token


def test_prefix_evicted_to_cpu_is_swapped_back_faster_than_recompute(smollm, capsys):
    model, tok = smollm
    bm = InProcessBlockManager(BlockManager(watermark=0))
    engine = Engine(model, bm, EngineConfig(block_size=BS, num_blocks=16, num_cpu_blocks=32), {tok.eos_token_id})
    assert bm.stats()["executor-0"]["cpu"]["total"] == 32
    prompt = tok.encode("The history of the printing press begins in the fifteenth century. " * 20)[:192]
    filler = tok.encode("Rivers carve valleys over thousands of years, slowly and patiently. " * 30)[:250]  # 16 blocks with its output token: the whole pool
    cold, warm_device, warm_cpu, tiers = [], [], [], []
    for i in range(3):
        t, cold_token = first_token(engine, f"cold-{i}", prompt, salt=f"cold-{i}")  # a salt no one else has
        cold.append(t)
        t, token = first_token(engine, f"dev-{i}", prompt, salt=f"cold-{i}")
        warm_device.append(t)
        assert token == cold_token
        first_token(engine, f"fill-{i}", filler)  # evicts the prompt's blocks to the CPU tier
        look = bm.cache_lookup(prompt, f"cold-{i}")["executor-0"]
        tiers.append(look)
        assert look["cpu_tokens"] >= 0.9 * look["cached_tokens"] and look["cached_tokens"] == len(prompt)
        before = bm.stats()["executor-0"]["cpu_tier"]["in_blocks"]
        t, token = first_token(engine, f"cpu-{i}", prompt, salt=f"cold-{i}")
        warm_cpu.append(t)
        assert token == cold_token, "K/V swapped back from the CPU tier gives the same output"
        # Every CPU-tier block of the prompt but its last full one (the last prompt token is
        # always computed, so that block is not looked up).
        assert bm.stats()["executor-0"]["cpu_tier"]["in_blocks"] - before == look["cpu_tokens"] // BS - 1
    med = {k: statistics.median(v) * 1000 for k, v in
           (("cold", cold), ("warm_cpu", warm_cpu), ("warm_device", warm_device))}
    with capsys.disabled():
        print(f"\nTTFT of a {len(prompt)}-token prompt (median of 3, ms): cold {med['cold']:.1f}, "
              f"warm from CPU tier {med['warm_cpu']:.1f} ({tiers[0]['cpu_tokens']} tokens swapped in), "
              f"device hit {med['warm_device']:.1f}")
    assert med["warm_cpu"] < med["cold"] and med["warm_device"] < med["cold"]
