"""Prefix caching, preemption (swap and recompute) and n > 1 forks change no output."""

import pytest

from executor.request import SamplingParams, seed_for_child

BS = 8
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def run_one_by_one(engine, prompts, params=GREEDY):
    return [engine.generate([p], params)[0] for p in prompts]


@pytest.fixture(scope="module")
def shared_prefix_prompts(smollm):
    _, tok = smollm
    base = tok.encode("You are a careful assistant. Answer every question in one short sentence, "
                      "and never make anything up. Here is the question:" * 2)
    assert len(base) > 4 * BS + 1
    tails = [tok.encode(" What colour is the sky?"), tok.encode(" Name a large mammal.")]
    prompts = []
    for k in (2, 3):
        for cut in (k * BS - 1, k * BS, k * BS + 1):  # share k*bs-1, k*bs, k*bs+1 tokens
            prompts.append(base[:cut] + tails[0])
            prompts.append(base[:cut] + tails[1])
    prompts.append(base + tails[0])
    prompts.append(base + tails[0])  # the same prompt twice: a full hit
    prompts.append(base[: 4 * BS])  # a prompt made only of cached full blocks
    prompts.append(base[: 4 * BS])
    return prompts


def test_prefix_caching_changes_no_output(make_engine, shared_prefix_prompts):
    cold, cold_bm = make_engine(block_size=BS, prefix_caching=False)
    warm, warm_bm = make_engine(block_size=BS)
    expected = run_one_by_one(cold, shared_prefix_prompts)
    got = run_one_by_one(warm, shared_prefix_prompts)
    assert got == expected
    stats = warm_bm.stats()["executor-0"]["prefix_cache"]
    assert stats["hits_blocks"] > 10 and stats["hits_tokens"] == stats["hits_blocks"] * BS
    assert cold_bm.stats()["executor-0"]["prefix_cache"]["hits_blocks"] == 0
    # Batched together (hits within one batch are impossible, then possible for later ones).
    assert warm.generate(shared_prefix_prompts, GREEDY) == expected


def test_full_hit_still_computes_the_last_token(make_engine, shared_prefix_prompts):
    engine, bm = make_engine(block_size=BS)
    prompt = shared_prefix_prompts[-1]  # exactly 4 full blocks
    first = engine.generate([prompt], GREEDY)[0]
    engine.record_steps = True
    engine.add_request("again", prompt, GREEDY)
    out = []
    while engine.has_work():
        for o in engine.step():
            out += o.new_token_ids
    assert out == first
    # 3 of 4 blocks come from the cache; the last block is recomputed for the logits.
    assert engine.step_records[0].scheduled == {"again": BS}


def test_cache_salt_isolates(make_engine, shared_prefix_prompts):
    engine, bm = make_engine(block_size=BS)
    prompt = shared_prefix_prompts[-3]
    engine.add_request("a", prompt, GREEDY, cache_salt="tenant-a")
    while engine.has_work():
        engine.step()
    engine.add_request("b", prompt, GREEDY, cache_salt="tenant-b")
    engine.step()
    assert engine.requests["b"].num_cached_tokens == 0
    engine.abort("b")
    engine.add_request("c", prompt, GREEDY, cache_salt="tenant-a")
    engine.step()
    assert engine.requests["c"].num_cached_tokens > 0


def test_preemption_by_swap_and_recompute_changes_no_output(make_engine, shared_prefix_prompts):
    prompts = [p[:40 + 5 * i] for i, p in enumerate(shared_prefix_prompts[:8])]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    big, _ = make_engine(block_size=BS, prefix_caching=False)
    expected = big.generate(prompts, params)
    # 8 sequences of up to ~100 tokens need ~90 blocks; 30 force preemption, and a CPU pool of
    # 6 blocks holds at most one swapped sequence, so the others must be recomputed.
    small, bm = make_engine(block_size=BS, num_blocks=30, num_cpu_blocks=6, prefix_caching=False)
    assert small.generate(prompts, params) == expected
    s = bm.stats()["executor-0"]
    assert s["preemptions"]["swap"] > 0 and s["preemptions"]["recompute"] > 0, s
    assert s["swap_out_blocks"] > 0 and s["swap_in_blocks"] == s["swap_out_blocks"]
    assert s["device"]["used"] == 0 and s["cpu"]["used"] == 0


def test_parallel_sampling_shares_prompt_blocks(make_engine, shared_prefix_prompts):
    # A prompt ending mid-block: its last block is shared, then copied on each child's first write.
    prompt = next(p for p in shared_prefix_prompts if len(p) % BS)
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.95, seed=1234, n=4, ignore_eos=True)
    engine, bm = make_engine(block_size=BS, prefix_caching=False)
    engine.add_request("par", prompt, params)
    outs = {i: [] for i in range(4)}
    peak_fork = 0
    while engine.has_work():
        for o in engine.step():
            assert o.request_id == "par"
            outs[o.index] += o.new_token_ids
        peak_fork = max(peak_fork, bm.stats()["executor-0"]["device"]["used"])
    assert all(len(v) == 10 for v in outs.values())
    # Each completion equals a lone request with that completion's derived seed.
    for i in range(4):
        lone, lone_bm = make_engine(block_size=BS, prefix_caching=False)
        single = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.95, seed=seed_for_child(1234, i),
                                ignore_eos=True)
        assert lone.generate([prompt], single)[0] == outs[i], f"completion {i}"
    assert len({tuple(v) for v in outs.values()}) > 1, "distinct seeds give distinct samples"
    separate = 4 * -(-(len(prompt) + 10) // BS)
    assert peak_fork < separate, (peak_fork, separate)
    assert bm.stats()["executor-0"]["copy_on_write"] > 0
    assert bm.stats()["executor-0"]["device"]["used"] == 0


def test_prompt_that_can_never_fit_is_refused_without_holding_the_queue(make_engine, smollm, shared_prefix_prompts):
    engine, bm = make_engine(block_size=BS, num_blocks=6)  # 48 token slots
    engine.add_request("huge", shared_prefix_prompts[-3] * 2, GREEDY)
    engine.add_request("small", shared_prefix_prompts[0][:10], GREEDY)
    outs = {"huge": [], "small": []}
    first_step = engine.step()
    assert [(o.request_id, o.finish_reason) for o in first_step if o.finished] == [("huge", "error")]
    assert "KV blocks" in first_step[0].error
    for o in first_step:
        outs[o.request_id] += o.new_token_ids
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
    assert outs["small"] and (len(outs["small"]) == GREEDY.max_tokens or outs["small"][-1] == smollm[1].eos_token_id)
    assert bm.stats()["executor-0"]["device"]["used"] == 0
