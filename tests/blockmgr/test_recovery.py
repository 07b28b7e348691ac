"""Failure recovery in the block manager: executor incarnations and fencing, block-op ordering."""

import pytest
import torch

from blockmgr import protocol
from blockmgr.client import InProcessBlockManager, StaleIncarnation, UnknownExecutor
from blockmgr.manager import BlockManager, BlockManagerError, StaleIncarnationError, UnknownExecutorError
from executor.engine import Engine, EngineConfig
from executor.model_runner import KVCache
from executor.request import SamplingParams

BS = 4


def cached_manager(incarnation="first"):
    """A manager whose executor 'ex' holds one running sequence and two cached blocks of another."""
    events = []
    bm = BlockManager(watermark=0, on_events=events.extend)
    bm.register("ex", 8, BS, incarnation=incarnation)
    bm.step("ex", incarnation=incarnation, admit=[("done", list(range(9)), 9, None, 0)])
    bm.step("ex", incarnation=incarnation, free=["done"])  # its 2 full blocks stay cached
    bm.step("ex", incarnation=incarnation, admit=[("live", [50] * 6, 6, None, 0)])
    assert bm.match_prefix(list(range(9))) == {"ex": 8}
    return bm, events


def test_new_incarnation_drops_everything_of_the_old_one():
    bm, events = cached_manager()
    events.clear()
    reply = bm.register("ex", 8, BS, incarnation="second")  # same geometry: the process restarted
    assert reply == {"resumed": False, "num_seqs": 0, "dropped_seqs": 1}
    assert events == [["AllBlocksCleared", "ex"]]
    st = bm.stats()["ex"]
    assert st["device"]["used"] == 0 and st["prefix_cache"]["cached_blocks"] == 0 and st["num_seqs"] == 0
    assert bm.match_prefix(list(range(9))) == {"ex": 0}, "no stale prefix hit on the new, empty KV cache"
    r = bm.step("ex", incarnation="second", admit=[("again", list(range(9)), 9, None, 0)])
    assert r["admitted"] == {"again": 0}
    # "live" belonged to the old process: the new one may reuse the id.
    assert "live" in bm.step("ex", incarnation="second", admit=[("live", [1] * 4, 4, None, 0)])["admitted"]


def test_old_incarnation_is_refused_after_a_new_one_registered():
    bm, _ = cached_manager()
    bm.register("ex", 8, BS, incarnation="second")
    before = bm.stats()["ex"]
    with pytest.raises(StaleIncarnationError, match="'first' was replaced by incarnation 'second'"):
        bm.step("ex", incarnation="first", grow=[("live", 7, [50])])
    with pytest.raises(StaleIncarnationError, match="replaced"):
        bm.register("ex", 8, BS, incarnation="first")  # a late reconnect of the dead process
    assert bm.stats()["ex"] == before, "a refused message changes nothing"
    assert bm.executors["ex"].incarnation == "second"


def test_same_incarnation_resumes_after_a_reconnect_and_a_restart_from_a_snapshot():
    bm, _ = cached_manager()
    assert bm.register("ex", 8, BS, incarnation="first") == {"resumed": True, "num_seqs": 1, "dropped_seqs": 0}
    bm.register("ex", 8, BS, incarnation="second")
    bm.step("ex", incarnation="second", admit=[("s", [3] * 5, 5, None, 0)])
    restarted = BlockManager(watermark=0)  # a block manager restarted from its saved state
    restarted.restore(bm.snapshot("ex"))
    assert restarted.register("ex", 8, BS, incarnation="second")["resumed"]
    r = restarted.step("ex", incarnation="second", grow=[("s", 9, [3] * 4)])
    assert r["updates"] == {"s": [2, [r["updates"]["s"][1][0]]]}
    with pytest.raises(StaleIncarnationError):
        restarted.step("ex", incarnation="first", free=["s"])


def test_service_refuses_a_stale_incarnation_with_a_clear_error(blockmgr_service):
    client = blockmgr_service
    with pytest.raises(UnknownExecutor, match="unknown executor 'ex'"):
        client.step("ex", step_id=1, incarnation="first", admit=[("a", [1] * 5, 5, None, 0)])
    client.register("ex", 8, BS, incarnation="first")
    client.step("ex", step_id=1, incarnation="first", admit=[("a", [1] * 5, 5, None, 0)])
    client.register("ex", 8, BS, incarnation="second")
    with pytest.raises(StaleIncarnation, match="incarnation 'first' was replaced"):
        client.step("ex", step_id=2, incarnation="first", grow=[("a", 6, [1])])
    reply = client._call({"op": "step", "executor_id": "ex", "incarnation": "first", "free": ["a"]})
    assert reply["ok"] is False and reply["code"] == "stale_incarnation"
    assert client.stats()["ex"]["device"]["used"] == 0


GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_restarted_executor_gets_no_stale_blocks_and_the_old_process_is_fenced(smollm):
    """The bug of issue 12: a restarted executor (same geometry, empty KV cache) was served the
    old process's prefix-cache blocks, i.e. attention over zeros, silently."""
    model, tok = smollm
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 3)
    config = EngineConfig(block_size=BS, num_blocks=64)
    reference = Engine(model, InProcessBlockManager(BlockManager()), config, {tok.eos_token_id}).generate(
        [prompt], GREEDY)
    bm = InProcessBlockManager(BlockManager())
    first = Engine(model, bm, config, {tok.eos_token_id})
    assert first.generate([prompt], GREEDY) == reference
    first.add_request("in-flight", prompt[:5], GREEDY)
    first.step()
    second = Engine(model, bm, config, {tok.eos_token_id})  # same executor id: the process restarted
    assert second.incarnation != first.incarnation
    second.add_request("r", prompt, GREEDY)
    outs = []
    while second.has_work():
        outs += second.step()
    assert outs[0].num_cached_tokens == 0, "nothing of the dead process's cache is offered"
    assert [t for o in outs for t in o.new_token_ids] == reference[0]
    with pytest.raises(StaleIncarnation):
        first.step()
    assert bm.stats()["executor-0"]["device"]["used"] == 0


def test_block_manager_restarted_without_its_state_gets_the_executor_registered_again(smollm):
    model, tok = smollm
    prompts = [tok.encode("def add(a, b):"), tok.encode("1, 1, 2, 3, 5, 8,")]
    config = EngineConfig(block_size=BS, num_blocks=64)
    reference = Engine(model, InProcessBlockManager(BlockManager()), config, {tok.eos_token_id}).generate(
        prompts, GREEDY)
    bm = InProcessBlockManager(BlockManager())
    engine = Engine(model, bm, config, {tok.eos_token_id})
    outs = {"a": [], "b": []}
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)
    for _ in range(3):
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
    assert all(0 < len(v) < 6 for v in outs.values())
    bm.manager = BlockManager()  # restarted, no Redis: it knows nothing of this executor
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
    assert [outs["a"], outs["b"]] == reference, "every sequence resumed by recompute"
    assert bm.stats()["executor-0"]["device"]["used"] == 0


SWAP_CHEAP = {"bytes_per_block": 1, "copy_bandwidth": 1e9, "flops_per_token": 1e9, "flops_per_s": 1e9}


def test_copy_on_write_runs_before_the_swap_out_of_its_copy():
    """A sequence copies its shared last block on write, then is swapped out in the same step to
    make room: the copy must land before the swap-out reads the block (issue 12)."""
    bm = BlockManager(watermark=0)
    bm.register("ex", 4, BS, num_cpu_blocks=8, cost=SWAP_CHEAP)
    bm.step("ex", admit=[("p", [1] * 6, 6, None, 5)])  # blocks 0, 1; the least important
    bm.step("ex", admit=[("q", [2] * 4, 4, None, 0)])  # block 2
    r = bm.step("ex", fork=[("p", "c")], grow=[("p", 7, [3]), ("q", 5, [2])])
    # p copies its shared block 1 to 3, then q needs a block: p is swapped out, block 3 with it.
    assert r["preempted"] == {"p": "swap"} and r["copies"] == [[1, 3]]
    (cpu0, cpu1) = [c for _, c in r["swap_out"]]
    assert r["ops"] == [["copy", [[1, 3]]], ["swap_out", [[0, cpu0], [3, cpu1]]]]

    # The executor runs them in that order on real tensors.
    kv = KVCache(torch.device("cpu"),  # only the KV tensors are needed, not a model
                 [tuple(torch.arange(4.0).repeat_interleave(8).view(4, 2, 2, 2) + 10 * k for k in (1, 2))],
                 [tuple(torch.zeros(8, 2, 2, 2) for _ in range(2))])
    kv.apply_block_ops(r["ops"])
    for dev, cpu in zip(kv.layers[0], kv.cpu_layers[0]):
        assert torch.equal(cpu[cpu1], dev[1]), "the swapped-out copy holds block 1's K/V, not stale data"
        assert torch.equal(cpu[cpu0], dev[0])


def test_duplicate_swap_in_or_grow_is_refused_whole():
    bm = BlockManager(watermark=0)
    bm.register("ex", 4, BS, num_cpu_blocks=8, cost=SWAP_CHEAP)
    bm.step("ex", admit=[("a", [1] * 8, 8, None, 0)])
    bm.step("ex", admit=[("b", [2] * 8, 8, None, 0)])
    assert bm.step("ex", grow=[("a", 9, [1])])["preempted"] == {"b": "swap"}
    bm.step("ex", free=["a"])
    before = bm.snapshot("ex")
    with pytest.raises(BlockManagerError, match=r"swap_in: sequence\(s\) \['b'\] listed more than once"):
        bm.step("ex", swap_in=["b", "b"], admit=[("c", [3] * 4, 4, None, 0)])
    with pytest.raises(BlockManagerError, match="grow: .*listed more than once"):
        bm.step("ex", grow=[("x", 1, [1]), ("x", 1, [1])])
    after = bm.snapshot("ex")
    assert {k: v for k, v in after.items() if k != "saved_at"} == {k: v for k, v in before.items() if k != "saved_at"}, \
        "nothing of a refused step is applied"
    r = bm.step("ex", swap_in=["b"])
    # (a swap_out may come first: a cached block evicted by the swap-in moves to the CPU tier)
    assert r["swapped_in"] == ["b"] and [op for op in r["ops"] if op[0] == "swap_in"] == [["swap_in", r["swap_in"]]]


def test_state_restored_from_stale_storage_is_dropped_not_obeyed():
    """Redis missed steps (it was down) and the block manager restarted from it: the executor's next
    step id shows the gap; the stale state must not hand out blocks that are in use."""
    bm = BlockManager(watermark=0)
    bm.register("ex", 8, BS, incarnation="i")
    bm.step("ex", step_id=1, incarnation="i", admit=[("a", [1] * 5, 5, None, 0)])
    stale = protocol.decode(protocol.encode(bm.snapshot("ex")))  # as saved: a copy, not the live lists
    bm.step("ex", step_id=2, incarnation="i", grow=[("a", 6, [1])])
    bm.step("ex", step_id=3, incarnation="i", admit=[("b", [2] * 5, 5, None, 0)])
    events = []
    restarted = BlockManager(watermark=0, on_events=events.extend)
    restarted.restore(stale)
    assert restarted.step("ex", step_id=2, incarnation="i", grow=[("a", 6, [1])])["updates"] == {}, \
        "the next step (a retry of a lost reply) is fine"
    with pytest.raises(UnknownExecutorError, match="missed steps"):
        restarted.step("ex", step_id=4, incarnation="i", grow=[("a", 7, [1])])
    assert "ex" not in restarted.executors and events[-1] == ["AllBlocksCleared", "ex"]
    assert restarted.register("ex", 8, BS, incarnation="i")["resumed"] is False
