"""Beam search (width 4) returns HF transformers' best beam, and beams share their history."""

import pytest
import torch

from executor.request import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "My favourite season is autumn because"]
MAX_NEW = 12
BS = 4


@pytest.fixture(scope="module")
def hf_beams(smollm_dir, smollm):
    from transformers import AutoModelForCausalLM

    _, tok = smollm
    hf = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    out = []
    for text in PROMPTS:
        ids = tok.encode(text)
        with torch.inference_mode():
            seq = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              num_beams=4, do_sample=False, length_penalty=1.0, early_stopping=False,
                              max_new_tokens=MAX_NEW, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        out.append((ids, seq[0, len(ids):].tolist()))
    return out


def test_beam_search_matches_hf_and_shares_blocks(make_engine, smollm, hf_beams):
    _, tok = smollm
    params = SamplingParams(max_tokens=MAX_NEW, use_beam_search=True, beam_width=4)
    greedy_engine, _ = make_engine(block_size=BS)
    greedy = greedy_engine.generate([ids for ids, _ in hf_beams], SamplingParams(max_tokens=MAX_NEW, temperature=0))
    assert any(g != expected for g, (_, expected) in zip(greedy, hf_beams)), "beam search must differ from greedy somewhere"
    for ids, expected in hf_beams:
        engine, bm = make_engine(block_size=BS)
        engine.add_request("beam", ids, params)
        got, peak = [], 0
        while engine.has_work():
            for o in engine.step():
                assert o.finished, "a beam search answers once, with its best beam"
                got = o.new_token_ids
            peak = max(peak, bm.stats()["executor-0"]["device"]["used"])
        assert got == expected, tok.decode(ids)
        # Four beams without sharing would each hold a full copy of prompt + output.
        unshared = 4 * -(-(len(ids) + MAX_NEW) // BS)
        assert peak < unshared
        assert bm.stats()["executor-0"]["device"]["used"] == 0
