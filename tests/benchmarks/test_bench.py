"""`pagedserve bench`: workloads, the offline and HF runners, the online client and the CLI.

A tiny random-weight Llama (with the real SmolLM2 tokenizer, so prompts are real text) keeps these
fast; the figures themselves come from real runs documented in the README.
"""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from benchmarks.serving import hf_baseline, offline, online
from benchmarks.serving.workloads import (
    SHARED_PREFIX_LEN,
    TextSource,
    lognormal_mu,
    make_workload,
    sharegpt_lengths,
)


@pytest.fixture(scope="module")
def source(tok):
    return TextSource(tok)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm_dir):
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as a HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=49152, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    d = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm_dir / name, d / name)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from executor.model_loader import load_model

    return load_model(tiny_dir, progress=False)


def test_lognormal_lengths_have_the_paper_means():
    assert lognormal_mu(161, 1.0) == pytest.approx(np.log(161) - 0.5)
    pairs = sharegpt_lengths(np.random.default_rng(1), 40_000, max_model_len=10**9)
    ins, outs = np.array(pairs).T
    assert ins.mean() == pytest.approx(161, rel=0.04)
    assert outs.mean() == pytest.approx(338, rel=0.03)
    capped = sharegpt_lengths(np.random.default_rng(1), 2000, max_model_len=256)
    assert all(i + o <= 256 and i >= 4 and o >= 1 for i, o in capped)


def test_workloads_are_real_text_cut_to_the_drawn_lengths(tok, source):
    a = make_workload("sharegpt", tok, num_requests=6, seed=3, max_model_len=512, source=source)
    b = make_workload("sharegpt", tok, num_requests=6, seed=3, max_model_len=512, source=source)
    assert [r.prompt_token_ids for r in a.requests] == [r.prompt_token_ids for r in b.requests]
    lengths = sharegpt_lengths(np.random.default_rng(3), 6, 512)
    assert [(len(r.prompt_token_ids), r.output_len) for r in a.requests] == lengths
    words = " ".join(r.prompt for r in a.requests).split()
    assert sum(w.isalpha() for w in words) > 0.5 * len(words)  # prose, not random ids

    alpaca = make_workload("alpaca", tok, num_requests=3, source=source)
    assert {(len(r.prompt_token_ids), r.output_len) for r in alpaca.requests} == {(19, 58)}

    shared = make_workload("shared-prefix", tok, num_requests=4, source=source)
    prefix = shared.requests[0].prompt_token_ids[:SHARED_PREFIX_LEN]
    for r in shared.requests:
        assert r.prompt_token_ids[:SHARED_PREFIX_LEN] == prefix
        assert 10 <= len(r.prompt_token_ids) - SHARED_PREFIX_LEN <= 40

    par = make_workload("parallel-sampling", tok, num_requests=3, source=source)
    assert all(r.n == 4 and r.temperature > 0 and r.seed is not None for r in par.requests)
    beam = make_workload("beam", tok, num_requests=3, source=source)
    assert all(r.beam_width == 4 and r.n == 1 for r in beam.requests)
    dec = make_workload("decode", tok, concurrency=5, source=source)
    assert len(dec.requests) == 5 and {r.output_len for r in dec.requests} == {128}
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope", tok, source=source)


def test_static_kv_utilization_by_hand():
    # Prompts 2 and 4 padded to 4; outputs 1 and 3. Step 1: live (2+1)+(4+1)=8 of 2*5=10;
    # step 2: only the second, 6 of 12; step 3: 7 of 14.
    u, steps = hf_baseline.static_kv_utilization([2, 4], [1, 3])
    assert steps == 3 and u == pytest.approx((8 / 10 + 6 / 12 + 7 / 14) / 3)


def _engine(tiny, **kw):
    cfg = offline.OfflineConfig(offline.EngineConfig(num_blocks=kw.pop("num_blocks", 512), **kw))
    return offline.make_engine(tiny, {2}, cfg)


def test_offline_run_measures_utilization_and_sharing(tiny, tok, source):
    wl = make_workload("sharegpt", tok, num_requests=4, seed=1, max_model_len=80, source=source)
    engine, bm = _engine(tiny)
    res = offline.run(engine, bm, wl, progress=False)
    assert res["output_tokens"] == res["expected_output_tokens"] == sum(r.output_len for r in wl.requests)
    assert 0.5 < res["kv_utilization"] <= 1.0
    assert res["sharing_savings"] == pytest.approx(0.0, abs=1e-9)  # distinct prompts: nothing shared
    assert all(t is not None for t in res["ttft_s"] + res["e2e_s"])
    assert res["decode_tokens_per_s"] > 0 and res["timeline"][-1]["used_blocks"] == 0

    par = make_workload("parallel-sampling", tok, num_requests=3, seed=1, max_model_len=80, source=source)
    engine, bm = _engine(tiny)
    res = offline.run(engine, bm, par, progress=False)
    assert res["output_tokens"] == 4 * sum(r.output_len for r in par.requests)
    assert res["sharing_savings"] > 0.15
    assert res["peak_used_blocks"] < res["peak_unshared_blocks"]


@pytest.mark.skipif(not offline.beam_search_supported(), reason="executor has no beam search")
def test_offline_beam_shares_blocks(tiny, tok, source):
    wl = make_workload("beam", tok, num_requests=2, seed=2, max_model_len=64, source=source)
    engine, bm = _engine(tiny)
    res = offline.run(engine, bm, wl, progress=False)
    assert res["sharing_savings"] > 0.2
    assert bm.stats()[offline.EXECUTOR_ID]["device"]["used"] == 0


def test_beam_without_executor_support_fails_clearly(monkeypatch, tok, source):
    monkeypatch.setattr(offline, "beam_search_supported", lambda: False)
    wl = make_workload("beam", tok, num_requests=1, source=source)
    with pytest.raises(offline.BeamSearchUnavailable, match="beam search in the executor"):
        offline.sampling_params(wl.requests[0])


def test_prefix_ttft_warm_requests_hit_the_cache(tiny, tok, source):
    wl = make_workload("shared-prefix", tok, num_requests=4, source=source)
    engine, bm = _engine(tiny)
    res = offline.prefix_ttft(engine, bm, wl, samples=2)
    assert len(res["cold_ttft_s"]) == len(res["warm_ttft_s"]) == 2
    assert res["warm_cached_tokens_per_request"] >= SHARED_PREFIX_LEN - 16
    assert res["warm_over_cold"] > 0


def test_hf_baseline_counts_requested_tokens(tiny_dir, tok, source):
    model, hf_tok = hf_baseline.load_hf(tiny_dir)
    wl = make_workload("sharegpt", tok, num_requests=3, seed=5, max_model_len=48, source=source)
    res = hf_baseline.run_hf(model, hf_tok, wl, batch_size=2, progress=False)
    assert res["output_tokens"] == sum(r.output_len for r in wl.requests)
    assert len(res["e2e_s"]) == 3 and res["e2e_s"][0] <= res["e2e_s"][2]
    assert 0 < res["static_kv_utilization"] <= 1


def test_arrivals_are_poisson():
    times = online.arrival_times(4000, rate=2.0, seed=0)
    gaps = np.diff(times)
    assert times[0] == 0 and gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert online.arrival_times(3, float("inf"), 0) == [0.0, 0.0, 0.0]


def test_serve_benchmark_against_a_gateway(smollm_dir, tok, source):
    from tests.gateway.fakes import fake_app, serve_in_thread

    app, _, _ = fake_app(tok)
    wl = make_workload("alpaca", tok, num_requests=4, source=source)
    with serve_in_thread(app) as url:
        res = online.run_serve(url, wl, rate=50.0, seed=0, progress=False)
        shared = make_workload("shared-prefix", tok, num_requests=3, source=source, shared_output_len=4)
        res2 = online.run_serve(url, shared, rate=float("inf"), progress=False)
    assert res["num_errors"] == 0, res["errors"]
    assert res["output_tokens"] > 0 and res["output_tokens_per_s"] > 0
    for key in ("ttft", "itl", "e2e"):
        assert res[key]["p50"] is not None and res[key]["p50"] <= res[key]["p99"]
    assert res2["num_errors"] == 0 and "warm_over_cold" in res2


def test_bench_cli_writes_json_and_plots(tiny_dir, tmp_path, capsys):
    from gateway.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "throughput", "--model", str(tiny_dir), "--workload", "sharegpt,parallel-sampling,decode",
              "--num-requests", "3", "--max-model-len", "48", "--concurrency", "2", "--hf-batch-sizes", "1,3",
              "--num-threads", "1", "--num-blocks", "256", "--output-dir", str(tmp_path), "--quiet"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "ours / HF" in out and "| sharegpt |" in out
    (path,) = tmp_path.glob("throughput-*.json")
    res = json.loads(path.read_text())
    assert res["command"].startswith("pagedserve bench throughput")
    names = [e["label"] for e in res["workloads"]]
    assert names == ["sharegpt", "parallel-sampling", "decode (concurrency 2)"]
    assert res["workloads"][0]["hf_best_batch_size"] in (1, 3) and res["workloads"][0]["ours_over_hf"] > 0
    assert len(list(tmp_path.glob("throughput-*.png"))) == 3


def test_bench_without_matplotlib_fails_before_running(monkeypatch, tmp_path, capsys):
    from gateway.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "throughput", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "pagedserve[bench]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
