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


def _tiny_runner(weight: torch.Tensor):
    from types import SimpleNamespace

    from executor.linear import Linear
    from executor.model_runner import ModelRunner

    lm_head = Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(weight)
    model = SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=2, lm_head=lm_head, compute_logits=lm_head)
    return ModelRunner(model, num_blocks=4, block_size=4), lm_head


def test_a_changed_weight_rebuilds_the_head():
    g = torch.Generator().manual_seed(2)
    runner, lm_head = _tiny_runner(torch.randn(3000, 32, generator=g))
    first = runner.greedy_head
    h = torch.randn(4, 32, generator=g)
    assert runner.greedy_tokens(h) == argmax_rows(runner.logits(h))
    with torch.no_grad():
        lm_head.weight[1234] = h[0] * 10  # in place: a new version of the same tensor
    assert runner.greedy_tokens(h) == argmax_rows(runner.logits(h))
    assert runner.greedy_tokens(h)[0] == 1234 and runner.greedy_head is not first


def test_a_weight_it_cannot_bound_falls_back_to_the_logits(caplog):
    w = torch.randn(300, 16)
    w[7, 3] = float("nan")
    with caplog.at_level("WARNING", logger="executor.model_runner"):
        runner, _ = _tiny_runner(w)
    assert runner.greedy_head is None
    assert "argmax of the whole logits" in caplog.text
    h = torch.randn(3, 16)
    assert runner.greedy_tokens(h) == argmax_rows(runner.logits(h)) == [7, 7, 7]  # the first NaN wins
