"""n > 1 siblings: aborting a request stops every completion and frees all their blocks in one
step, even after completion 0 has finished; aborting one completion leaves its siblings alone."""

import pytest

from blockmgr.client import InProcessBlockManager
from blockmgr.manager import BlockManager
from executor.engine import Engine, EngineConfig
from executor.request import SamplingParams

PARAMS = SamplingParams(max_tokens=40, temperature=0.9, seed=7, n=3, ignore_eos=True)


@pytest.fixture
def engine(smollm):
    model, tok = smollm
    bm = InProcessBlockManager(BlockManager())
    engine = Engine(model, bm, EngineConfig(block_size=8, num_blocks=128), {tok.eos_token_id})
    return engine, bm, tok.encode("Once upon a time, in a land far away,")


def used(bm) -> int:
    return bm.stats()["executor-0"]["device"]["used"]


def test_abort_stops_every_sibling_in_one_step(engine):
    engine, bm, prompt = engine
    engine.add_request("r", prompt, PARAMS)
    for _ in range(3):
        engine.step()
    assert {r.request_id for r in engine.scheduler.running} == {"r", "r#1", "r#2"} and used(bm) > 0
    assert engine.abort("r")
    assert engine.step() == []  # no sibling decodes another token...
    assert used(bm) == 0 and not engine.has_work()  # ...and all their blocks went back at once


def test_abort_after_completion_zero_finished_still_stops_its_siblings(engine):
    engine, bm, prompt = engine
    engine.add_request("r", prompt, PARAMS)
    for _ in range(3):
        engine.step()
    assert engine.abort("r", index=0)  # completion 0 is over (e.g. the gateway saw its stop string)
    outs = engine.step()
    assert {o.index for o in outs} == {1, 2}  # the siblings go on
    assert "r" not in engine.requests
    assert engine.abort("r")
    engine.step()
    assert used(bm) == 0 and not engine.has_work()


def test_aborting_one_completion_frees_only_its_blocks(engine):
    engine, bm, prompt = engine
    engine.add_request("r", prompt, PARAMS)
    engine.step()
    engine.step()
    assert engine.abort("r", index=1) and not engine.abort("r", index=1) and not engine.abort("r", index=5)
    counts = {0: 0, 1: 0, 2: 0}
    while engine.has_work():
        for o in engine.step():
            counts[o.index] += len(o.new_token_ids)
    assert counts[1] == 0 and counts[0] == counts[2] == PARAMS.max_tokens - 2
    assert used(bm) == 0 and not engine.groups.children
