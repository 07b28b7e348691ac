"""A request resumed on another executor (from the tokens it already produced) continues exactly."""

import pytest

from blockmgr.client import InProcessBlockManager
from blockmgr.manager import BlockManager
from executor.engine import Engine, EngineConfig
from executor.request import SamplingParams

CONFIG = EngineConfig(block_size=4, num_blocks=64)


def engine(smollm):
    model, tok = smollm
    return Engine(model, InProcessBlockManager(BlockManager()), CONFIG, {tok.eos_token_id})


def run(eng, rid, prompt, params, output_token_ids=None):
    eng.add_request(rid, prompt, params, output_token_ids=output_token_ids)
    out = []
    while eng.has_work():
        for o in eng.step():
            out += o.new_token_ids
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0, frequency_penalty=1.5, presence_penalty=0.5, ignore_eos=True),
], ids=["seeded", "greedy-with-penalties"])
def test_resumed_request_continues_token_for_token(smollm, params):
    prompt = smollm[1].encode("Once upon a time")
    full = run(engine(smollm), "r", prompt, params)
    assert len(full) == 10
    other = engine(smollm)  # another executor: nothing of the first one's state
    assert run(other, "r", prompt, params, output_token_ids=full[:4]) == full[4:]


def test_resume_is_refused_where_it_cannot_be_exact(smollm):
    eng = engine(smollm)
    with pytest.raises(ValueError, match="n=1"):
        eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5, n=2), output_token_ids=[4])
    with pytest.raises(ValueError, match="already has 5 of its 5"):
        eng.add_request("b", [1, 2, 3], SamplingParams(max_tokens=5), output_token_ids=[4] * 5)
    assert not eng.has_work()
