"""Plain greedy rows through the runner's screened LM head (kernels.greedy_head_cpu, SmolLM2 fp32
on the CPU): the same tokens, log-probabilities and n > 1 forks as from the whole logits, in
batches that mix them with rows that need the logits (log-probabilities, penalties, min_tokens,
sampling, beams)."""

from collections import defaultdict

import pytest
import torch

from executor.request import SamplingParams
from executor.sampler import takes_raw_argmax
from kernels import greedy_head_cpu
from kernels.argmax_cpu import argmax_rows

pytestmark = pytest.mark.skipif(not greedy_head_cpu.available(), reason="no AVX512-BF16 or AMX here")

BS = 16


def _prompts(tok) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    texts = ["The three primary colours are", "def fibonacci(n):", "Once upon a time, in a small village,"]
    return [tok.encode(t) for t in texts] + [torch.randint(100, 49152, (40,), generator=g).tolist()]


PARAMS = [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),  # plain greedy: the screen
    SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0, min_tokens=5, stop_token_ids=[13]),
    SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0, n=2, ignore_eos=True),
    SamplingParams(max_tokens=8, use_beam_search=True, beam_width=2, temperature=0, ignore_eos=True),
]


def _run(engine, prompts) -> dict:
    """Every output of every (prompt, params) pair, in order."""
    for i, prompt in enumerate(prompts):
        for j, params in enumerate(PARAMS):
            engine.add_request(f"r{i}-{j}", prompt, params)
    outs = defaultdict(list)
    while engine.has_work():
        for out in engine.step():
            outs[out.request_id].append((out.index, out.new_token_ids, out.logprobs, out.finish_reason))
    return dict(outs)


def test_mixed_batches_give_what_the_whole_logits_give(make_engine, smollm):
    prompts = _prompts(smollm[1])
    screened, _ = make_engine(block_size=BS)
    assert screened.runner.greedy_head is not None
    whole, _ = make_engine(block_size=BS)
    whole.runner.greedy_head = None
    assert _run(screened, prompts) == _run(whole, prompts)
    assert screened.runner.greedy_head.exact_logits > 0  # the screen ran


def test_greedy_tokens_are_the_argmax_of_the_logits(make_engine, smollm):
    engine, _ = make_engine(block_size=BS)
    runner = engine.runner
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(24, smollm[0].hidden_size, generator=g) * 2.5  # about the final norm's scale
    with torch.inference_mode():
        hidden = smollm[0].norm(hidden)
    expected = argmax_rows(runner.logits(hidden))
    before = runner.greedy_head.exact_logits
    assert runner.greedy_tokens(hidden) == expected
    assert 24 <= runner.greedy_head.exact_logits - before < 24 * 200


def test_only_plain_greedy_requests_skip_the_logits():
    from executor.request import Request

    def req(**kw):
        return Request("x", [1, 2, 3], SamplingParams(**kw))

    assert takes_raw_argmax(req(temperature=0))
    for kw in ({"temperature": 0.7}, {"temperature": 0, "logprobs": 0}, {"temperature": 0, "presence_penalty": 0.5},
               {"temperature": 0, "logit_bias": [[5, 1.0]]}, {"temperature": 0, "min_tokens": 1}):
        assert not takes_raw_argmax(req(**kw)), kw
