"""``pagedserve bench``: throughput (offline, in-process engine) and serve (online, HTTP) benchmarks.

    pagedserve bench throughput [--workload sharegpt,alpaca,...|all] [--num-requests 12] [--seed 0]
                                [--hf-batch-sizes 4,8] [--concurrency 1,16] [--output-dir bench-results]
    pagedserve bench serve --url http://127.0.0.1:8000 [--workload sharegpt] [--request-rate 0.5,1,inf]

Results go to ``<output-dir>/<kind>-<timestamp>.json`` and PNG plots beside it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from benchmarks.serving.workloads import WORKLOADS
from benchmarks.settings import BenchmarkSettings
from blockmgr.config import BlockManagerSettings
from blockmgr.settings import load, reuse, separated_list, setting
from executor.config import ExecutorSettings, ModelSettings

DEFAULT_WORKLOADS = ("sharegpt", "alpaca", "shared-prefix", "parallel-sampling", "beam")


def _workloads(names: list[str]) -> list[str]:
    out = []
    for w in names:
        out += list(DEFAULT_WORKLOADS) if w == "all" else [w]
    bad = [w for w in out if w not in WORKLOADS]
    if bad:
        raise ValueError(f"unknown workload(s) {bad}; expected {', '.join(WORKLOADS)} or all")
    return out


Workloads = separated_list(",", check=_workloads)


class BenchSettings(BenchmarkSettings):
    """What both benchmarks take: the workloads, the model, where results go."""

    workload: Workloads = setting(["sharegpt"], f"from {', '.join(WORKLOADS)}; 'all' = {','.join(DEFAULT_WORKLOADS)}")
    num_requests: int = setting(12, "requests per workload (a few minutes on 2 CPU cores)", ge=1)
    seed: int = setting(0, "seeds lengths, texts and sampling")
    max_model_len: int = setting(512, "cap on input + output tokens of sharegpt-like draws (short runs; the README's "
                                      "figures use 1024; the model allows 8192)", ge=2)
    shared_output_len: int = setting(32, "output tokens per shared-prefix request", ge=1)
    model: str | None = reuse(ModelSettings, "model")
    output_dir: str = setting("bench-results", "where JSON and PNG files go")
    plots: bool = setting(True, "write no PNG plots", flag="--no-plots")
    quiet: bool = setting(False, "no progress bars")
    concurrency: separated_list(",", int) = setting([1, 16], "decode workload: concurrent requests")


class ThroughputSettings(BenchSettings):
    """``pagedserve bench throughput``: the engine in this process, and the HF baseline."""

    hf_batch_sizes: separated_list(",", int) = setting([4, 8], "HF static batch sizes to try on n=1 workloads; the "
                                                               "best counts")
    hf_workloads: Workloads = setting(["sharegpt", "alpaca", "decode"], "workloads that also run the HF baseline "
                                                                        "(n=1, no beam)")
    hf: bool = setting(True, "skip the HF baseline", flag="--no-hf")
    num_threads: int | None = reuse(ExecutorSettings, "num_threads")
    device: str | None = reuse(ExecutorSettings, "device")
    block_size: int = reuse(ExecutorSettings, "block_size")
    num_blocks: int = reuse(ExecutorSettings, "num_blocks")
    kv_cache_gib: float = reuse(ExecutorSettings, "kv_cache_gib")
    max_num_seqs: int = reuse(ExecutorSettings, "max_num_seqs")
    max_num_batched_tokens: int | None = reuse(ExecutorSettings, "max_num_batched_tokens")
    prefix_caching: bool = reuse(BlockManagerSettings, "prefix_caching")
    prefix_ttft_samples: int = setting(3, "shared-prefix: requests timed cold and (others) warm", ge=1)


class ServeBenchSettings(BenchSettings):
    """``pagedserve bench serve``: Poisson arrivals against a running gateway."""

    url: str = setting("http://127.0.0.1:8000", "the gateway")
    request_rate: separated_list(",", float) = setting([float("inf")], "requests/s; inf sends all at once")
    served_model_name: str | None = setting(None, "model name to send (default: the first of /v1/models)")
    timeout: float = setting(3600.0, "per-request timeout, s", gt=0)


def _parse(cls, prog: str, description: str, argv: list[str]):
    settings, parser = load(cls, argv, prog, description)
    if settings.plots:
        from benchmarks.serving.plots import missing

        if hint := missing():
            parser.error(hint)
    return settings


def _metadata(argv: list[str], threads: int | None) -> dict:
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": "pagedserve bench " + shlex.join(argv),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": threads,
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }


def _result_path(out_dir: Path, kind: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def _write(path: Path, results: dict) -> Path:
    """Write (or rewrite: after every workload, so an interrupted run keeps what it measured)."""
    path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    return path


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


# --------------------------------------------------------------------------------------------------
def throughput(argv: list[str]) -> int:
    args = _parse(ThroughputSettings, "pagedserve bench throughput", "Offline benchmark: the engine in this "
                  "process, no HTTP, with an HF transformers static-batching baseline measured in the same run.", argv)

    import torch

    from executor.threads import default_num_threads

    # Both systems (ours and the HF baseline) run with these threads.
    num_threads = args.num_threads or default_num_threads(1)[0]
    torch.set_num_threads(num_threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from executor.model_loader import default_model_path, load_model, resolve_model_dir
    from executor.server import kv_bytes_per_block
    from benchmarks.serving import hf_baseline, offline, plots
    from benchmarks.serving.workloads import TextSource, make_workload

    hf_logging.set_verbosity_error()
    model_dir = resolve_model_dir(args.model or default_model_path())
    tok = AutoTokenizer.from_pretrained(model_dir)
    source = TextSource(tok)
    model = load_model(model_dir, device=device, progress=not args.quiet)
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    engine_fields = ("block_size", "num_blocks", "kv_cache_gib", "max_num_seqs", "max_num_batched_tokens")
    per_block = kv_bytes_per_block(model, args.block_size, torch.float32)
    cfg = offline.OfflineConfig(ExecutorSettings(**{f: getattr(args, f) for f in engine_fields}, swap_space=0)
                                .with_pool_sizes(per_block), args.prefix_caching, device)
    results = _metadata(["throughput", *argv], num_threads) | {
        "kind": "throughput", "model": str(model_dir), "engine": cfg.summary(), "workloads": [],
    }
    progress = not args.quiet
    path = _result_path(Path(args.output_dir), "throughput")
    # Warm-up: one-time allocations and lazy initialisation fall outside the measurements.
    engine, bm = offline.make_engine(model, eos_ids, cfg)
    engine.generate([source.ids[:64]], offline.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    del engine, bm
    hf = None
    failed = []
    jobs = [(w, c) for w in args.workload for c in (args.concurrency if w == "decode" else [None])]
    for name, conc in jobs:
        wl = make_workload(name, tok, num_requests=args.num_requests, seed=args.seed,
                           max_model_len=args.max_model_len, concurrency=conc or 16,
                           shared_output_len=args.shared_output_len, source=source)
        label = f"{name} (concurrency {conc})" if conc else name
        entry = {"workload": name, "label": label, "params": wl.summary()}
        print(f"\n== {label}: {json.dumps(wl.summary())}", flush=True)
        try:
            engine, bm = offline.make_engine(model, eos_ids, cfg)
            ours = offline.run(engine, bm, wl, desc=f"ours {label}", progress=progress)
        except offline.BeamSearchUnavailable as exc:
            print(f"   FAILED: {exc}", file=sys.stderr, flush=True)
            entry["error"] = str(exc)
            failed.append(name)
            results["workloads"].append(entry)
            _write(path, results)
            continue
        entry["ours"] = ours
        print(f"   ours: {_fmt(ours['output_tokens_per_s'], '.2f')} output tok/s "
              f"({ours['output_tokens']} tokens in {ours['elapsed_s']:.1f} s), "
              f"decode {_fmt(ours['decode_tokens_per_s'], '.2f')} tok/s, "
              f"KV utilization {_fmt(100 * ours['kv_utilization'] if ours['kv_utilization'] else None)}%, "
              f"sharing savings {100 * ours['sharing_savings']:.1f}%, preemptions {ours['preemptions']}", flush=True)
        if name == "shared-prefix":
            engine, bm = offline.make_engine(model, eos_ids, cfg)
            entry["prefix_ttft"] = offline.prefix_ttft(engine, bm, wl, args.prefix_ttft_samples)
            t = entry["prefix_ttft"]
            print(f"   TTFT cold {t['cold_ttft_median_s']:.3f} s, warm {t['warm_ttft_median_s']:.3f} s: "
                  f"warm/cold = {100 * t['warm_over_cold']:.1f}%", flush=True)
        del engine, bm
        hf_ok = args.hf and name in args.hf_workloads and all(r.n == 1 and not r.beam_width for r in wl.requests)
        if hf_ok:
            if hf is None:
                hf = hf_baseline.load_hf(model_dir)
                hf[0].to(device)
                hf_baseline.warm_up(*hf)
            sizes = [conc] if conc else args.hf_batch_sizes
            entry["hf"] = []
            for bs in sizes:
                r = hf_baseline.run_hf(*hf, wl, bs, progress=progress)
                entry["hf"].append(r)
                print(f"   HF static bs={bs}: {r['output_tokens_per_s']:.2f} output tok/s ({r['elapsed_s']:.1f} s), "
                      f"static KV utilization {100 * r['static_kv_utilization']:.1f}%", flush=True)
            best = max(entry["hf"], key=lambda r: r["output_tokens_per_s"])
            entry["hf_best_batch_size"] = best["batch_size"]
            entry["ours_over_hf"] = ours["output_tokens_per_s"] / best["output_tokens_per_s"]
            print(f"   ours / HF (best bs={best['batch_size']}) = {entry['ours_over_hf']:.2f}x", flush=True)
        results["workloads"].append(entry)
        _write(path, results)
    results["summary"] = summary_table(results)
    print("\n" + results["summary"])
    _write(path, results)
    print(f"\nresults: {path}")
    if args.plots:
        stem = path.with_suffix("")
        runs = [e["ours"] for e in results["workloads"] if "ours" in e and e["workload"] != "decode"]
        hfs = [h for e in results["workloads"] for h in e.get("hf", []) if e["workload"] != "decode"]
        # Completion-time CDF: the first workload with an HF baseline (sharegpt when it ran).
        cdf_workload = next((h["workload"] for h in hfs), runs[0]["workload"] if runs else None)
        pngs = [plots.memory_over_time(runs, Path(f"{stem}-memory.png")),
                plots.throughput_bars(runs, hfs, Path(f"{stem}-throughput.png")),
                plots.offline_latency_cdfs([e for e in runs + hfs if e["workload"] == cdf_workload],
                                           Path(f"{stem}-completion-cdf.png"))]
        print("plots: " + ", ".join(str(x) for x in pngs))
    if failed:
        print(f"\nworkloads that failed: {', '.join(failed)}", file=sys.stderr)
        return 3
    return 0


def summary_table(results: dict) -> str:
    """A Markdown table of the offline results."""
    rows = ["| workload | requests | mean in/out tokens | ours output tok/s | decode tok/s | HF best (bs) tok/s "
            "| ours/HF | KV util | sharing savings | warm/cold TTFT |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for e in results["workloads"]:
        s = e["params"]
        if "error" in e:
            rows.append(f"| {e['label']} | {s['num_requests']} | {s['mean_input_tokens']:.0f}/"
                        f"{s['mean_output_tokens']:.0f} | failed: {e['error']} | | | | | | |")
            continue
        o = e["ours"]
        hf = ""
        if e.get("hf"):
            best = max(e["hf"], key=lambda r: r["output_tokens_per_s"])
            hf = f"{best['output_tokens_per_s']:.2f} ({best['batch_size']})"
        ratio = f"{e['ours_over_hf']:.2f}x" if "ours_over_hf" in e else ""
        ttft = f"{100 * e['prefix_ttft']['warm_over_cold']:.1f}%" if "prefix_ttft" in e else ""
        savings = f"{100 * o['sharing_savings']:.1f}%" if o["sharing_savings"] > 0.0005 else "0"
        rows.append(f"| {e['label']} | {s['num_requests']} | {s['mean_input_tokens']:.0f}/{s['mean_output_tokens']:.0f} "
                    f"| {o['output_tokens_per_s']:.2f} | {_fmt(o['decode_tokens_per_s'], '.2f')} | {hf} | {ratio} "
                    f"| {_fmt(100 * o['kv_utilization'] if o['kv_utilization'] else None)}% | {savings} | {ttft} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
def serve(argv: list[str]) -> int:
    args = _parse(ServeBenchSettings, "pagedserve bench serve",
                  "Online benchmark against a running gateway (Poisson arrivals).", argv)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from executor.model_loader import default_model_path, resolve_model_dir
    from benchmarks.serving import online, plots
    from benchmarks.serving.workloads import TextSource, make_workload

    hf_logging.set_verbosity_error()
    model_dir = resolve_model_dir(args.model or default_model_path())
    tok = AutoTokenizer.from_pretrained(model_dir)
    source = TextSource(tok)
    results = _metadata(["serve", *argv], None) | {"kind": "serve", "url": args.url, "runs": []}
    jobs = [(w, c) for w in args.workload for c in (args.concurrency if w == "decode" else [None])]
    for name, conc in jobs:
        wl = make_workload(name, tok, num_requests=args.num_requests, seed=args.seed,
                           max_model_len=args.max_model_len, shared_output_len=args.shared_output_len,
                           concurrency=conc or 16, source=source)
        for rate in args.request_rate:
            r = online.run_serve(args.url, wl, rate, seed=args.seed, model=args.served_model_name,
                                 timeout_s=args.timeout, progress=not args.quiet)
            r["params"] = wl.summary()
            r["label"] = f"{name} (concurrency {conc})" if conc else name
            results["runs"].append(r)
            extra = f", warm/cold TTFT {100 * r['warm_over_cold']:.1f}%" if "warm_over_cold" in r else ""
            print(f"{r['label']} @ {rate} req/s: {r['output_tokens_per_s']:.2f} output tok/s, "
                  f"{r['requests_per_s']:.3f} req/s, TTFT p50/p90/p99 "
                  f"{_fmt(r['ttft']['p50'], '.3f')}/{_fmt(r['ttft']['p90'], '.3f')}/{_fmt(r['ttft']['p99'], '.3f')} s, "
                  f"ITL p50/p90/p99 {_fmt(r['itl']['p50'], '.3f')}/{_fmt(r['itl']['p90'], '.3f')}/"
                  f"{_fmt(r['itl']['p99'], '.3f')} s, e2e p50/p90/p99 {_fmt(r['e2e']['p50'], '.2f')}/"
                  f"{_fmt(r['e2e']['p90'], '.2f')}/{_fmt(r['e2e']['p99'], '.2f')} s, errors {r['num_errors']}{extra}",
                  flush=True)
            for err in r["errors"]:
                print(f"   error: {err}", file=sys.stderr)
    path = _write(_result_path(Path(args.output_dir), "serve"), results)
    print(f"results: {path}")
    if args.plots and results["runs"]:
        stem = path.with_suffix("")
        pngs = [plots.throughput_vs_rate(results["runs"], Path(f"{stem}-throughput-vs-rate.png")),
                plots.latency_cdfs(results["runs"], Path(f"{stem}-latency-cdf.png"))]
        print("plots: " + ", ".join(str(x) for x in pngs))
    return 1 if any(r["num_errors"] for r in results["runs"]) else 0


def main(argv: list[str]) -> int:
    commands = {"throughput": throughput, "serve": serve}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])
