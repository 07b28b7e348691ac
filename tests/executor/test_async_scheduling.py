"""Pipelined (async) scheduling: in steady decoding the engine sends the next step's block-manager
request before the forward pass and reads the reply after it (``Engine._send_ahead``). The tokens
must be those of one-step-at-a-time scheduling, whatever ends, aborts, arrives or is preempted
while a request is in flight, and no block may leak."""

import pytest

from executor.engine import Engine, EngineConfig
from executor.request import SamplingParams

BS = 4
TEXTS = ["The capital of France is", "def fib(n):", "Once upon a time, in a land far away, there lived", "1, 2, 3,"]
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(smollm):
    _, tok = smollm
    return [tok.encode(t) for t in TEXTS]


def used(bm) -> int:
    return bm.stats()["executor-0"]["device"]["used"]


def watch(engine) -> dict:
    """Count the steps sent ahead and the preemptions their replies carried."""
    seen = {"ahead": 0, "preempted_ahead": 0}
    send, finish = engine.link.send, engine.link.finish

    def counted_send(**lists):
        seen["ahead"] += 1
        send(**lists)

    def counted_finish():
        reply = finish()
        seen["preempted_ahead"] += len(reply["preempted"]) if reply else 0
        return reply

    engine.link.send, engine.link.finish = counted_send, counted_finish
    return seen


def run(engine, requests: dict) -> dict:
    got = {rid: [] for rid in requests}
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    while engine.has_work():
        for out in engine.step():
            assert out.error is None
            got[out.request_id] += out.new_token_ids
    return got


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_steady_decodes_are_sent_ahead_with_the_same_tokens(make_engine, prompts, params):
    results = {}
    for pipelined in (True, False):
        engine, bm = make_engine(block_size=BS, async_scheduling=pipelined)
        seen = watch(engine)
        results[pipelined] = run(engine, {f"r{i}": (ids, params) for i, ids in enumerate(prompts)})
        assert used(bm) == 0
        assert (seen["ahead"] >= 15) if pipelined else seen["ahead"] == 0, seen
    assert results[True] == results[False]
    assert all(len(out) == 20 for out in results[True].values())


def test_what_ends_or_is_aborted_while_in_flight_drops_out_and_frees_its_blocks(make_engine, prompts):
    engine, bm = make_engine(block_size=BS, async_scheduling=False)
    ref = run(engine, {"a": (prompts[0], GREEDY), "b": (prompts[1], GREEDY), "c": (prompts[2], GREEDY)})
    # "a" ends on a stop token the step after its request for the next step went out.
    k = next(i for i in range(3, 20) if ref["a"][i] not in ref["a"][:i])
    stop_a = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[ref["a"][k]])
    engine, bm = make_engine(block_size=BS)
    seen = watch(engine)
    for rid, ids, params in (("a", prompts[0], stop_a), ("b", prompts[1], GREEDY), ("c", prompts[2], GREEDY)):
        engine.add_request(rid, ids, params)
    got = {"a": [], "b": [], "c": []}
    while engine._ahead is None:
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert engine.abort("c")
    while engine.has_work():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert got["a"] == ref["a"][: k + 1] and got["b"] == ref["b"]
    assert seen["ahead"] > k and used(bm) == 0 and not engine.requests


def test_preemption_in_a_reply_read_after_the_pass(make_engine, prompts):
    """A pool too small for every output: steady decodes run out of blocks, and the block manager
    preempts in a reply to a step sent ahead; the tokens stay those of unpipelined scheduling."""
    requests = {f"r{i}": (ids, SamplingParams(max_tokens=28, temperature=0, ignore_eos=True))
                for i, ids in enumerate(prompts)}
    for swap in (0, 64):
        results, seen = {}, None
        for pipelined in (True, False):
            engine, bm = make_engine(block_size=BS, num_blocks=24, num_cpu_blocks=swap, async_scheduling=pipelined)
            watched = watch(engine)
            results[pipelined] = run(engine, requests)
            assert used(bm) == 0
            if pipelined:
                seen = watched
        assert results[True] == results[False]
        assert seen["preempted_ahead"] > 0, seen


def test_over_the_service_the_round_trip_is_pipelined(blockmgr_service, smollm, make_engine, prompts):
    model, tok = smollm
    service = blockmgr_service
    engine = Engine(model, service, EngineConfig(block_size=BS, num_blocks=256), {tok.eos_token_id})
    seen = watch(engine)
    requests = {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompts)}
    got = run(engine, requests)
    reference, _ = make_engine(block_size=BS, async_scheduling=False)
    assert got == run(reference, requests)
    assert seen["ahead"] >= 15 and used(service) == 0
