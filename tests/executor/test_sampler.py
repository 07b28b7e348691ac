"""The sampler on hand-made logits: each parameter's semantics, seeds, log-probabilities."""

import math

import pytest
import torch

from executor.request import MAX_LOGPROBS, Request, SamplingParams, seed_for_child
from executor.sampler import _apply_penalties, prompt_logprob_entries, sample, sample_with_logprobs

V = 50


def req(prompt=(1, 2, 3), output=(), **params):
    r = Request("r", list(prompt), SamplingParams(**params))
    r.output_token_ids = list(output)
    return r


def logits_row(seed=0):
    return torch.randn(1, V, generator=torch.Generator().manual_seed(seed)) * 3


def draws(logits, n=4000, **params):
    """n unseeded draws from one row, batched as n identical rows."""
    return torch.tensor(sample(logits.expand(n, -1), [req(**params) for _ in range(n)]))


def test_greedy_is_argmax_lowest_id_on_ties():
    logits = torch.zeros(2, V)
    logits[0, 7] = logits[0, 9] = 5.0
    logits[1, 3] = 1.0
    assert sample(logits, [req(temperature=0), req(temperature=0)]) == [7, 3]


def test_greedy_on_bf16_logits_is_the_fp32_argmax():
    """An all-greedy batch without logprobs takes the maximum of bf16 logits as they come (no fp32
    copy); a batch that needs fp32 (logprobs) picks the same tokens, ties to the lowest id."""
    logits = (torch.randn(6, V, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16)
    logits[0, 7] = logits[0, 9] = 20.0  # a tie
    logits[1, 4] = logits[1, 40] = 20.0
    fp32 = logits.float()
    plain = sample_with_logprobs(logits, [req(temperature=0) for _ in range(6)])
    with_logprobs = sample_with_logprobs(logits, [req(temperature=0, logprobs=1) for _ in range(6)])
    assert plain.token_ids == with_logprobs.token_ids == fp32.max(dim=-1).indices.tolist()
    assert plain.token_ids[:2] == [7, 4]
    assert plain.logprobs == [None] * 6


def test_sampling_follows_the_softmax():
    logits = logits_row(1)
    probs = torch.softmax(logits[0] / 0.7, -1)
    got = torch.bincount(draws(logits, 20000, temperature=0.7), minlength=V).double() / 20000
    assert (got - probs.double()).abs().max() < 0.02


def test_top_k_top_p_min_p_keep_only_their_sets():
    logits = logits_row(2)
    order = logits[0].argsort(descending=True)
    probs = torch.softmax(logits[0], -1)
    assert set(draws(logits, top_k=3).tolist()) <= set(order[:3].tolist())
    # top_p: the smallest prefix (by probability) whose mass reaches top_p.
    cum = probs[order].cumsum(0)
    keep = int((cum < 0.8).sum()) + 1
    assert set(draws(logits, top_p=0.8).tolist()) <= set(order[:keep].tolist())
    assert len(set(draws(logits, top_p=0.8).tolist())) > 1
    min_p = 0.3
    allowed = set((probs >= min_p * probs.max()).nonzero().flatten().tolist())
    assert set(draws(logits, min_p=min_p).tolist()) <= allowed
    # top_p tiny keeps just the most likely token.
    assert set(draws(logits, 200, top_p=1e-6).tolist()) == {int(order[0])}


def test_repetition_penalty_matches_hf():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = logits_row(3)
    r = req(prompt=[1, 4, 4, 9], output=[9, 12], repetition_penalty=1.3)
    mine = logits.clone()
    _apply_penalties(mine, [r])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([r.all_token_ids]), logits.clone())
    assert torch.equal(mine, ref)


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = logits_row(4)
    r = req(prompt=[5, 5, 5], output=[7, 7, 8], frequency_penalty=0.5, presence_penalty=0.25)
    mine = logits.clone()
    _apply_penalties(mine, [r])
    expected = logits.clone()
    expected[0, 7] -= 2 * 0.5 + 0.25
    expected[0, 8] -= 0.5 + 0.25
    assert torch.equal(mine, expected)  # the prompt's 5 is not penalised


def test_penalties_only_touch_their_rows():
    logits = torch.cat([logits_row(5), logits_row(6)])
    mine = logits.clone()
    _apply_penalties(mine, [req(output=[1]), req(output=[1, 2], presence_penalty=1.0)])
    assert torch.equal(mine[0], logits[0])
    assert mine[1, 1] == logits[1, 1] - 1 and mine[1, 2] == logits[1, 2] - 1


def test_min_tokens_suppresses_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 0] = 10.0  # EOS
    logits[0, 5] = 9.0  # a stop token id
    logits[0, 6] = 8.0
    early = req(output=[11], temperature=0, min_tokens=2, stop_token_ids=[5])
    assert sample(logits, [early], eos_token_ids={0}) == [6]
    done = req(output=[11, 12], temperature=0, min_tokens=2, stop_token_ids=[5])
    assert sample(logits, [done], eos_token_ids={0}) == [0]
    ignoring = req(output=[11], temperature=0, min_tokens=2, stop_token_ids=[5], ignore_eos=True)
    assert sample(logits, [ignoring], eos_token_ids={0}) == [0]


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = logits_row(7)
    params = dict(temperature=1.0, top_p=0.95, seed=123)
    r = req(**params)
    seq_alone = [sample(logits, [r])[0] for _ in range(8)]
    r2 = req(**params)
    others = torch.cat([logits_row(8), logits_row(9), logits_row(10)])
    seq_batched = []
    for step in range(8):  # at a different row each step, beside sampled, greedy and seeded rows
        k = step % 3
        batch = torch.cat([others[:k], logits, others[k:]])
        reqs = [req(temperature=0.5) for _ in range(k)] + [r2] + [req(temperature=0.9, seed=5) for _ in range(3 - k)]
        seq_batched.append(sample_with_logprobs(batch, reqs).token_ids[k])
    assert seq_alone == seq_batched
    assert len(set(seq_alone)) > 1


def test_logprobs_are_the_raw_log_softmax():
    logits = torch.cat([logits_row(11), logits_row(12)])
    reqs = [req(temperature=0.5, seed=1, logprobs=4, repetition_penalty=2.0, top_k=2), req(temperature=0, logprobs=0)]
    out = sample_with_logprobs(logits, reqs)
    raw = torch.log_softmax(logits, -1)
    for row, (tok, e) in enumerate(zip(out.token_ids, out.logprobs)):
        assert e["token_id"] == tok and math.isclose(e["logprob"], float(raw[row, tok]), abs_tol=1e-6)
    top = out.logprobs[0]["top"]
    assert [t for t, _ in top] == raw[0].topk(4).indices.tolist()
    assert out.logprobs[1]["top"] == []
    assert sample_with_logprobs(logits, [req(), req()]).logprobs == [None, None]


def test_prompt_logprob_entries():
    lp = torch.log_softmax(torch.cat([logits_row(13), logits_row(14)]), -1)
    entries = prompt_logprob_entries(lp, [4, 9], 2)
    assert [e["token_id"] for e in entries] == [4, 9]
    assert math.isclose(entries[1]["logprob"], float(lp[1, 9]), abs_tol=1e-7)
    assert [t for t, _ in entries[0]["top"]] == lp[0].topk(2).indices.tolist()


@pytest.mark.parametrize("bad, match", [
    (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(logprobs=MAX_LOGPROBS + 1), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(seed=2**64), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(stop_token_ids=["x"]), "stop_token_ids"),
])
def test_bad_parameters_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad).validate()


def test_from_dict_refuses_unknown_fields():
    assert SamplingParams.from_dict({"logprobs": 2, "min_p": 0.1}).logprobs == 2
    with pytest.raises(ValueError, match="unknown"):
        SamplingParams.from_dict({"best_of": 2})


def test_child_seeds_are_distinct_and_stable():
    seeds = [seed_for_child(42, i) for i in range(8)]
    assert seeds[0] == 42 and len(set(seeds)) == 8
    assert seeds == [seed_for_child(42, i) for i in range(8)]
    assert seed_for_child(None, 3) is None


def test_logit_bias_equals_a_manual_logits_edit():
    logits = torch.cat([logits_row(21), logits_row(22)])
    bias = [[3, 5.0], [7, -100.0], [12, 2.5], [int(logits[0].argmax()), -30.0]]
    edited = logits.clone()
    for t, b in bias:
        edited[0, t] += b
    # Seeded sampling: the biased row draws exactly what the hand-edited logits draw, step after step,
    # whatever sits in the other row; the other row is untouched.
    biased, manual = req(temperature=0.8, seed=9, logit_bias=bias), req(temperature=0.8, seed=9)
    other_a, other_b = req(temperature=0.8, seed=4), req(temperature=0.8, seed=4)
    for _ in range(20):
        got = sample(logits, [biased, other_a])
        want = sample(edited, [manual, other_b])
        assert got == want
    # Greedy: the argmax of the edited logits, in a batch beside unbiased greedy rows.
    out = sample_with_logprobs(torch.cat([logits, logits[:1]]),
                               [req(temperature=0, logit_bias=bias, logprobs=1), req(temperature=0), req(temperature=0)])
    assert out.token_ids == [int(edited[0].argmax()), int(logits[1].argmax()), int(logits[0].argmax())]
    assert out.token_ids[0] != out.token_ids[2]
    # Log-probabilities stay those of the raw logits.
    assert math.isclose(out.logprobs[0]["logprob"], float(torch.log_softmax(logits[0], -1)[out.token_ids[0]]),
                        abs_tol=1e-6)
    # -100 bans a token even when it was the only likely one.
    peaked = torch.full((1, V), -10.0)
    peaked[0, 5] = 20.0
    assert set(draws(peaked, 500, temperature=1.0, logit_bias=[[5, -100.0]]).tolist()).isdisjoint({5})


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 1e-6])
def test_tiny_temperature_is_greedy_and_never_nan(temperature):
    logits = torch.cat([logits_row(31), logits_row(32)]) * 10
    out = sample_with_logprobs(logits, [req(temperature=temperature, logprobs=2), req(temperature=temperature)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert math.isfinite(out.logprobs[0]["logprob"])


@pytest.mark.parametrize("bias", [[[1, 100.5]], [[-1, 1.0]], [[1]], [[True, 1.0]], [["1", 1.0]], "x",
                                  [[i, 1.0] for i in range(1025)]])
def test_bad_logit_bias_is_refused(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias).validate()
