"""The paged engine's greedy output equals HF transformers `generate`, token for token, in fp32."""

import pytest
import torch

from executor.request import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Explain in one paragraph why the sky is blue, as you would to a curious ten-year-old child "
    "who has just asked you during a long walk on a sunny afternoon in the park.",
    "Translate to French: I would like a cup of coffee, please.",
    "Q: What is the boiling point of water at sea level in degrees Celsius?\nA:",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who had never once left the valley. Every morning he",
]
MAX_NEW = 24
BLOCK_SIZE = 8  # small blocks: every prompt + output crosses several block boundaries


@pytest.fixture(scope="module")
def references(smollm_dir, smollm):
    from transformers import AutoModelForCausalLM

    _, tok = smollm
    hf = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    hf.eval()
    refs = []
    for text in PROMPTS:
        ids = tok.encode(text)
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.eos_token_id)
        refs.append((ids, out[0, len(ids):].tolist()))
    return refs


def test_prompts_cross_block_boundaries(references):
    lengths = [len(ids) + len(out) for ids, out in references]
    assert len(set(lengths)) >= 6, "prompts of different lengths"
    assert all(n > 2 * BLOCK_SIZE for n in lengths)
    assert any(len(ids) % BLOCK_SIZE != 0 for ids, _ in references)


def test_greedy_equals_hf_alone(make_engine, references):
    engine, bm = make_engine(block_size=BLOCK_SIZE, num_blocks=512)
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    for ids, expected in references:
        assert engine.generate([ids], greedy)[0] == expected
    assert bm.stats()["executor-0"]["device"]["used"] == 0


def test_greedy_equals_hf_all_at_once(make_engine, references):
    engine, bm = make_engine(block_size=BLOCK_SIZE, num_blocks=512)
    engine.record_steps = True
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    outs = engine.generate([ids for ids, _ in references], greedy)
    assert outs == [expected for _, expected in references]
    assert max(len(r.scheduled) for r in engine.step_records) == len(PROMPTS), "all ran in one batch"
    assert bm.stats()["executor-0"]["device"]["used"] == 0


def test_continuous_batching_joins_at_next_step(make_engine, references):
    """A request added while others decode runs in the very next step and still matches HF."""
    engine, _ = make_engine(block_size=BLOCK_SIZE, num_blocks=512)
    engine.record_steps = True
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    (ids0, exp0), (ids1, exp1) = references[0], references[4]
    engine.add_request("first", ids0, greedy)
    got = {"first": [], "late": []}
    for _ in range(5):
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    engine.add_request("late", ids1, greedy)
    joined_at = len(engine.step_records) + 1
    while engine.has_work():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    rec = engine.step_records[joined_at - 1]
    assert set(rec.scheduled) == {"first", "late"}
    assert got == {"first": exp0, "late": exp1}


def test_tiny_pool_preempts_and_still_matches(make_engine, references):
    """With too few blocks for everyone, sequences wait or are preempted, and nothing changes."""
    engine, bm = make_engine(block_size=BLOCK_SIZE, num_blocks=24)
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    outs = engine.generate([ids for ids, _ in references], greedy)
    assert outs == [expected for _, expected in references]
    assert engine.num_preemptions > 0, "the pool was meant to force preemption"
    assert bm.stats()["executor-0"]["device"]["used"] == 0
