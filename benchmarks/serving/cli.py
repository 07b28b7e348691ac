"""``pagedserve bench``: throughput (offline, in-process engine) and serve (online, HTTP) benchmarks.

    pagedserve bench throughput [--workload sharegpt,alpaca,...|all] [--num-requests 12] [--seed 0]
                                [--hf-batch-sizes 4,8] [--concurrency 1,16] [--output-dir bench-results]
    pagedserve bench serve --url http://127.0.0.1:8000 [--workload sharegpt] [--request-rate 0.5,1,inf]

Results go to ``<output-dir>/<kind>-<timestamp>.json`` and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from benchmarks.serving.workloads import WORKLOADS

DEFAULT_WORKLOADS = ("sharegpt", "alpaca", "shared-prefix", "parallel-sampling", "beam")


def _csv(kind):
    def parse(text: str):
        return [kind(x) for x in text.split(",") if x.strip()]
    return parse


def _workloads(text: str) -> list[str]:
    names = []
    for w in (w.strip() for w in text.split(",")):
        names += list(DEFAULT_WORKLOADS) if w == "all" else [w] if w else []
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown workload(s) {bad}; expected {', '.join(WORKLOADS)} or all")
    return names


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", type=_workloads, default=["sharegpt"],
                   help=f"comma-separated, from {', '.join(WORKLOADS)}; 'all' = {','.join(DEFAULT_WORKLOADS)} "
                        "(default sharegpt)")
    p.add_argument("--num-requests", type=int, default=12,
                   help="requests per workload (default %(default)s: a few minutes on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0, help="seeds lengths, texts and sampling (default %(default)s)")
    p.add_argument("--max-model-len", type=int, default=512,
                   help="cap on input + output tokens of sharegpt-like draws (default %(default)s, for short runs; "
                        "the README's figures use 1024; the model allows 8192)")
    p.add_argument("--shared-output-len", type=int, default=32, help="output tokens per shared-prefix request")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--output-dir", default="bench-results", help="where JSON and PNG files go (default %(default)s)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--concurrency", type=_csv(int), default=[1, 16],
                   help="decode workload: concurrent requests, comma-separated (default 1,16)")


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = p.parse_args(argv)
    if not args.no_plots:
        from benchmarks.serving.plots import missing

        if hint := missing():
            p.error(hint)
    return args


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
    p = argparse.ArgumentParser(prog="pagedserve bench throughput",
                                description="Offline benchmark: the engine in this process, no HTTP, with an "
                                            "HF transformers static-batching baseline measured in the same run.")
    _common(p)
    p.add_argument("--hf-batch-sizes", type=_csv(int), default=[4, 8],
                   help="HF static batch sizes to try on n=1 workloads; the best counts (default 4,8)")
    p.add_argument("--hf-workloads", type=_workloads, default=["sharegpt", "alpaca", "decode"],
                   help="workloads that also run the HF baseline (n=1, no beam; default sharegpt,alpaca,decode)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    p.add_argument("--num-threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="torch CPU threads for both systems (default: cores but one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=2048, help="KV blocks in the pool (default %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--prefix-ttft-samples", type=int, default=3,
                   help="shared-prefix: requests timed cold and (others) warm (default %(default)s)")
    args = _parse(p, argv)

    import torch

    torch.set_num_threads(args.num_threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from executor.model_loader import default_model_path, load_model, resolve_model_dir
    from benchmarks.serving import hf_baseline, offline, plots
    from benchmarks.serving.workloads import TextSource, make_workload

    hf_logging.set_verbosity_error()
    model_dir = resolve_model_dir(args.model or default_model_path())
    tok = AutoTokenizer.from_pretrained(model_dir)
    source = TextSource(tok)
    model = load_model(model_dir, device=args.device, progress=not args.quiet)
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    cfg = offline.OfflineConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                enable_prefix_caching=not args.no_prefix_caching, device=args.device)
    results = _metadata(["throughput", *argv], args.num_threads) | {
        "kind": "throughput", "model": str(model_dir), "engine": {k: str(v) for k, v in cfg.__dict__.items()},
        "workloads": [],
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
        hf_ok = not args.no_hf and name in args.hf_workloads and all(r.n == 1 and not r.beam_width for r in wl.requests)
        if hf_ok:
            if hf is None:
                hf = hf_baseline.load_hf(model_dir)
                hf[0].to(args.device)
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
    if not args.no_plots:
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
    p = argparse.ArgumentParser(prog="pagedserve bench serve",
                                description="Online benchmark against a running gateway (Poisson arrivals).")
    _common(p)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default %(default)s)")
    p.add_argument("--request-rate", type=_csv(float), default=[float("inf")],
                   help="requests/s, comma-separated; inf sends all at once (default inf)")
    p.add_argument("--served-model-name", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout, s")
    args = _parse(p, argv)

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
    if not args.no_plots and results["runs"]:
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
