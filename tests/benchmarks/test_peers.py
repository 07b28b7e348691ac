"""benchmarks/peers.py's pure parts: lscpu and vllm-bench parsing, the markdown table (no servers run)."""

import pytest

from benchmarks import peers

META = {"cpu": "AMD EPYC 9R14", "threads": 2, "model": "SmolLM2-135M-Instruct", "input_len": 128,
        "output_len": 128, "client": "vllm bench serve", "date": "2026-12-02 18:00 UTC",
        "command": "python benchmarks/peers.py"}


def test_parse_lscpu():
    text = "Architecture:    x86_64\nModel name:      AMD EPYC 9R14 96-Core Processor\nThread(s) per core:  2\n"
    assert peers.parse_lscpu(text) == "AMD EPYC 9R14 96-Core Processor"
    assert peers.parse_lscpu("Architecture: arm64\n") is None


def test_parse_vllm_bench_result():
    res = {"completed": 32, "failed": 0, "duration": 28.1, "total_output_tokens": 4096, "output_throughput": 145.8,
           "median_ttft_ms": 2100.5, "p99_ttft_ms": 2600.0, "mean_itl_ms": 46.2}
    got = peers.parse_vllm_bench(res)
    assert got == {"completed": 32, "failed": 0, "duration_s": 28.1, "output_tokens": 4096, "output_tok_s": 145.8,
                   "ttft_p50_ms": 2100.5, "ttft_p99_ms": 2600.0, "itl_mean_ms": 46.2, "errors": []}


def test_table_has_a_row_per_run_and_names_skipped_servers():
    rows = [{"server": "ours", "version": "pagedserve abc", "concurrency": c, "completed": 4, "failed": 0,
             "output_tok_s": 21.44, "ttft_p50_ms": 120.4, "ttft_p99_ms": None, "itl_mean_ms": 46.0,
             "peak_rss_mib": 2600.2} for c in (1, 16)]
    md = peers.table(rows, {"vllm": "not installed"}, META)
    assert "AMD EPYC 9R14" in md and "2 threads" in md
    assert "| ours | pagedserve abc | 1 | 4 | 21.4 | 120 | - | 46.0 | 2600 | 0 |" in md
    assert "| ours | pagedserve abc | 16 |" in md
    assert "- vllm: skipped, not installed" in md


def test_random_prompts_have_the_exact_length_and_no_special_tokens():
    prompts = peers.random_prompts(3, 128, 49152, seed=1)
    assert [len(p) for p in prompts] == [128] * 3
    assert all(1000 <= t < 49152 for p in prompts for t in p)
    assert prompts == peers.random_prompts(3, 128, 49152, seed=1)


def test_bf16_passes_the_dtype_to_ours_and_vllm_and_skips_llama(tmp_path):
    args = peers.parse_args(["--dtype", "bfloat16", "--num-threads", "2", "--peers-dir", str(tmp_path)])
    got = {s.name: s for s in peers.servers(args, tmp_path / "model", 16)}
    for name in ("ours", "vllm"):
        argv = got[name].argv
        assert argv[argv.index("--dtype") + 1] == "bfloat16", name
    assert "bfloat16 GGUF" in got["llama"].missing
    md = peers.table([], {}, {**META, "dtype": "bfloat16"})
    assert md.startswith("# Peers: SmolLM2-135M-Instruct bfloat16 on AMD EPYC 9R14")


def test_ours_and_vllm_get_the_same_kv_cache_budget(tmp_path):
    for argv, want in (([], "2"), (["--kv-cache-gib", "3"], "3")):
        args = peers.parse_args([*argv, "--num-threads", "2", "--peers-dir", str(tmp_path)])
        got = {s.name: s for s in peers.servers(args, tmp_path / "model", 16)}
        ours = got["ours"].argv
        assert ours[ours.index("--kv-cache-gib") + 1] == want
        assert got["vllm"].env["VLLM_CPU_KVCACHE_SPACE"] == want
    assert "KV cache 2 GiB (ours and vLLM)" in peers.table([], {}, {**META, "kv_cache_gib": 2})


def test_a_kv_budget_vllm_cannot_take_is_refused(capsys):
    # vLLM reads VLLM_CPU_KVCACHE_SPACE with int(): 1.5 would fail at its start, minutes in.
    with pytest.raises(SystemExit):
        peers.parse_args(["--kv-cache-gib", "1.5"])
    assert "--kv-cache-gib" in capsys.readouterr().err
