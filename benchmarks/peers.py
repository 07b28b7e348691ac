#!/usr/bin/env python3
"""Ours against llama.cpp's llama-server and vLLM CPU: the same load, the same client, one table.

Starts each server in turn on this machine (never two at once), waits until it answers
``/health``, sends the same load at each concurrency, stops it, and writes under ``--out``
(default docs/bench/):

- ``peers.md``: the table (output tok/s, TTFT p50 / p99, mean ITL, peak resident memory of the
  server's process tree, failed requests) with the CPU model, thread counts and versions;
- ``peers.json``: the same figures, every run's raw client result and the metadata;
- ``peers.png``: output tok/s against concurrency per server (when matplotlib is installed).

With ``--dtype bfloat16`` the files are ``peers-bf16.*``, and llama-server is skipped (the peers
setup converts an F32 GGUF only).

Servers:

- ``ours``: ``pagedserve serve --device cpu --num-threads T --kv-cache-gib K`` (this checkout);
- ``vllm``: vLLM CPU from ``$PEERS/vllm-venv`` (``../shared/peers/setup.sh vllm``), started with
  ``VLLM_CPU_OMP_THREADS_BIND=0-(T-1)`` and ``VLLM_CPU_KVCACHE_SPACE=K`` (``--kv-cache-gib``,
  default 2: the same KV budget for both, so their peak memory compares);
- ``llama``: ``$PEERS/llama-server`` on ``$PEERS/<model dir name>-f32.gguf`` (``setup.sh llama``
  and ``setup.sh gguf MODEL_DIR``), ``-t T -np C -c C*ctx``, restarted for each concurrency so it
  has a slot per client.

``$PEERS`` is ``~/.cache/pagedserve-peers`` (``--peers-dir``). A server that is not installed is
skipped, and the table says so.

The client: when the vLLM venv is there, ``vllm bench serve`` (``--backend openai --endpoint
/v1/completions --dataset-name random --random-range-ratio 0 --ignore-eos --temperature 0``) for
every server, ours included; otherwise the built-in one (:func:`run_builtin`), which sends prompts
of exactly ``--input-len`` random token ids (so every server sees the same token count), streams
``--output-len`` tokens with ``ignore_eos``, at most ``c`` requests in flight, and measures as
``benchmarks.serving.online`` does (TTFT to the first text chunk, ITL between chunks). Output tok/s is
the completions' token count over the wall time from the first request to the last answer; for
llama-server, whose last chunk's usage ``vllm bench serve`` does not read, it is completed
requests x ``--output-len`` / duration.

Not part of CI (minutes per server). Usage::

    python benchmarks/peers.py                                  # all installed servers, c = 1 16 64
    python benchmarks/peers.py --servers ours --concurrency 1 2 --num-prompts 2 4 \\
        --input-len 16 --output-len 8 --out /tmp/peers           # a quick check of the script
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.settings import BenchmarkSettings  # noqa: E402
from blockmgr.settings import load, reuse, separated_list, setting  # noqa: E402
from executor.config import ExecutorSettings, ModelSettings  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PEERS = Path.home() / ".cache" / "pagedserve-peers"


@dataclass
class Server:
    """How to start one server: argv, environment, port; ``missing`` says why it cannot run."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    missing: str | None = None
    version: str = ""
    start_timeout_s: float = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    """The CPU's model name from ``lscpu`` (``platform.processor()`` without it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return parse_lscpu(out) or platform.processor() or "unknown"


def parse_lscpu(text: str) -> str | None:
    """``lscpu`` output -> its "Model name" value (None when absent)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return None


def _version_of(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        return (p.stdout + p.stderr).strip().splitlines()[-1] if (p.stdout + p.stderr).strip() else ""
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def servers(args, model_dir: Path, concurrency: int) -> list[Server]:
    """The servers to run at one concurrency, installed or not (``missing`` set)."""
    import torch

    out = []
    t = args.num_threads
    if "ours" in args.servers:
        port = free_port()
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        out.append(Server("ours", [sys.executable, "-c", "from gateway.cli import main; main()", "serve",
                                   "--port", str(port), "--blockmgr-port", str(free_port()),
                                   "--executor-base-port", str(free_port()), "--device", "cpu",
                                   "--model", str(model_dir), "--served-model-name", MODEL_NAME,
                                   "--num-threads", str(t), "--max-num-seqs", str(max(64, concurrency)),
                                   "--dtype", args.dtype, "--kv-cache-gib", str(args.kv_cache_gib),
                                   "--log-level", "WARNING"],
                          port, env={"PYTHONPATH": str(REPO)}, version=f"pagedserve {commit}, torch {torch.__version__}"))
    peers = Path(args.peers_dir)
    if "vllm" in args.servers:
        py = peers / "vllm-venv" / "bin" / "python"
        port = free_port()
        srv = Server("vllm", [str(py), str(peers / "vllm_cli.py"), "serve", str(model_dir), "--port", str(port),
                              "--dtype", args.dtype, "--served-model-name", MODEL_NAME],
                     port, env={"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": f"0-{t - 1}",
                                "HF_HUB_OFFLINE": "1"}, start_timeout_s=600.0)
        if not py.exists():
            srv.missing = f"not installed ({py} missing: ../shared/peers/setup.sh vllm)"
        else:
            srv.version = "vLLM " + _version_of([str(py), "-c", "import vllm; print(vllm.__version__)"])
        out.append(srv)
    if "llama" in args.servers:
        exe, gguf = peers / "llama-server", peers / f"{model_dir.name}-f32.gguf"
        port = free_port()
        ctx = args.input_len + args.output_len + 16
        srv = Server("llama", [str(exe), "-m", str(gguf), "--port", str(port), "-t", str(t),
                               "-np", str(concurrency), "-c", str(concurrency * ctx), "-a", MODEL_NAME], port)
        if args.dtype != "float32":
            srv.missing = f"no {args.dtype} GGUF (the peers setup converts an F32 one only)"
        elif not exe.exists():
            srv.missing = f"not installed ({exe} missing: ../shared/peers/setup.sh llama)"
        elif not gguf.exists():
            srv.missing = f"no F32 GGUF ({gguf} missing: ../shared/peers/setup.sh gguf {model_dir})"
        else:
            srv.version = "llama.cpp " + _version_of([str(exe), "--version"])
        out.append(srv)
    return out


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, MiB (Linux ``/proc``; 0 when gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total / 1024


class RssSampler(threading.Thread):
    """Peak :func:`tree_rss_mib` of a process, sampled every ``period_s`` until :meth:`stop`."""

    def __init__(self, pid: int, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.period_s, self.peak = pid, period_s, 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss_mib(self.pid))
            self._done.wait(self.period_s)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def start(server: Server, log_path: Path) -> subprocess.Popen:
    """Start ``server`` (its own process group) and wait for ``/health``; raises RuntimeError."""
    import httpx

    log = open(log_path, "w")
    proc = subprocess.Popen(server.argv, env={**os.environ, **server.env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + server.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"{server.name} did not become healthy; log {log_path}:\n{log_path.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def random_prompts(num: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``num`` prompts of ``input_len`` token ids drawn from ``[1000, vocab)`` (no special tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(1000, vocab, size=(num, input_len)).tolist()


def run_builtin(url: str, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    """Send ``prompts`` with at most ``concurrency`` in flight; figures as :func:`parse_vllm_bench` returns."""
    import httpx

    from benchmarks.serving.online import _one, summarize
    from benchmarks.serving.workloads import BenchRequest, Workload

    reqs = [BenchRequest(prompt_token_ids=p, prompt=p, output_len=output_len) for p in prompts]

    class _NoBar:
        def update(self, _n):
            pass

    async def go():
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
            t0 = time.perf_counter()

            async def one(req):
                async with sem:
                    return await _one(client, url, req, MODEL_NAME, 0.0, time.perf_counter(), _NoBar())

            recs = await asyncio.gather(*[one(r) for r in reqs])
            return recs, time.perf_counter() - t0

    recs, elapsed = asyncio.run(go())
    res = summarize(Workload("random", reqs), float("inf"), recs, elapsed)
    ms = lambda v: None if v is None else 1e3 * v  # noqa: E731
    return {"completed": len(recs) - res["num_errors"], "failed": res["num_errors"], "duration_s": elapsed,
            "output_tokens": res["output_tokens"], "output_tok_s": res["output_tokens_per_s"],
            "ttft_p50_ms": ms(res["ttft"]["p50"]), "ttft_p99_ms": ms(res["ttft"]["p99"]),
            "itl_mean_ms": ms(res["itl"]["mean"]), "errors": res["errors"]}


def parse_vllm_bench(result: dict) -> dict:
    """A ``vllm bench serve --save-result`` JSON -> our figures (ms; tok/s)."""
    return {"completed": result.get("completed"), "failed": result.get("failed", 0),
            "duration_s": result.get("duration"), "output_tokens": result.get("total_output_tokens"),
            "output_tok_s": result.get("output_throughput"), "ttft_p50_ms": result.get("median_ttft_ms"),
            "ttft_p99_ms": result.get("p99_ttft_ms"), "itl_mean_ms": result.get("mean_itl_ms"), "errors": []}


def run_vllm_bench(vllm_py: Path, cli: Path, url: str, model_dir: Path, args, concurrency: int,
                   num_prompts: int) -> dict:
    """Run ``vllm bench serve`` against ``url``; returns :func:`parse_vllm_bench`'s figures."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [str(vllm_py), str(cli), "bench", "serve", "--backend", "openai", "--base-url", url,
                "--endpoint", "/v1/completions", "--model", MODEL_NAME, "--tokenizer", str(model_dir),
                "--dataset-name", "random", "--random-input-len", str(args.input_len),
                "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
                "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
                "--temperature", "0", "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99",
                "--save-result", "--result-dir", tmp, "--result-filename", "r.json"]
        subprocess.run(argv, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
        return parse_vllm_bench(json.loads((Path(tmp) / "r.json").read_text()))


def table(rows: list[dict], skipped: dict[str, str], meta: dict) -> str:
    """The markdown report: metadata, one row per (server, concurrency), then the skipped servers."""
    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    lines = [f"# Peers: {meta['model']} {meta.get('dtype', 'float32')} on {meta['cpu']}", "",
             f"{meta['threads']} threads per server; {meta['input_len']} tokens in, {meta['output_len']} out "
             f"(ignore_eos, greedy); " + (f"KV cache {meta['kv_cache_gib']} GiB (ours and vLLM); "
                                          if "kv_cache_gib" in meta else "")
             + f"client: {meta['client']}; {meta['date']}.", "",
             "| server | version | c | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL mean ms "
             "| peak RSS MiB | failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['version']} | {r['concurrency']} | {r['completed']} "
                     f"| {f(r['output_tok_s'])} | {f(r['ttft_p50_ms'], '.0f')} | {f(r['ttft_p99_ms'], '.0f')} "
                     f"| {f(r['itl_mean_ms'])} | {f(r['peak_rss_mib'], '.0f')} | {r['failed']} |")
    if skipped:
        lines += [""] + [f"- {name}: skipped, {why}" for name, why in skipped.items()]
    lines += ["", "Command: `" + meta["command"] + "`", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["server"] for r in rows):
        pts = [(r["concurrency"], r["output_tok_s"]) for r in rows if r["server"] == name and r["output_tok_s"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class PeersSettings(BenchmarkSettings):
    servers: separated_list(",", Literal["ours", "vllm", "llama"]) = setting(["ours", "vllm", "llama"],
                                                                             "servers to run: ours, vllm, llama")
    concurrency: separated_list(",", int) = setting([1, 16, 64], "requests in flight")
    num_prompts: separated_list(",", int) = setting([4, 32, 64], "requests per concurrency (one value per "
                                                                 "--concurrency)")
    input_len: int = setting(128, "prompt tokens of each request", ge=1)
    output_len: int = setting(128, "output tokens of each request", ge=1)
    num_threads: int | None = reuse(ExecutorSettings, "num_threads", description="torch CPU threads of each server "
                                                                                  "(default: the usable cores)")
    model: str | None = reuse(ModelSettings, "model")
    peers_dir: str = setting(str(DEFAULT_PEERS), "where the peers are installed ($PEERS)")
    client: Literal["auto", "vllm", "builtin"] = setting("auto", "auto: vllm bench serve when the vLLM venv is "
                                                                 "installed, else the built-in client")
    kv_cache_gib: int = setting(2, "KV cache of ours (--kv-cache-gib) and of vLLM (VLLM_CPU_KVCACHE_SPACE, which "
                                   "takes whole GiB), GiB: the same budget for both", ge=1)
    dtype: Literal["float32", "bfloat16"] = setting("float32", "weights, activations and KV cache of ours and vLLM "
                                                               "(bfloat16 skips llama-server)")
    out: str = setting(str(REPO / "docs" / "bench"), "where peers.{md,json,png} go (peers-bf16.* for bfloat16)")


def parse_args(argv=None) -> PeersSettings:
    args, parser = load(PeersSettings, argv, "peers.py", __doc__.split("\n\n")[0])
    if len(args.num_prompts) != len(args.concurrency):
        parser.error("--num-prompts needs one value per --concurrency")
    if args.num_threads is None:
        from executor.threads import default_num_threads

        args = args.model_copy(update={"num_threads": default_num_threads(1)[0]})
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from executor.model_loader import default_model_path, resolve_model_dir

    model_dir = resolve_model_dir(args.model or default_model_path())
    vllm_py = Path(args.peers_dir) / "vllm-venv" / "bin" / "python"
    client = args.client if args.client != "auto" else ("vllm" if vllm_py.exists() else "builtin")
    if client == "vllm" and not vllm_py.exists():
        raise SystemExit(f"--client vllm: {vllm_py} is not installed")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.num_threads, "model": MODEL_NAME,
            "dtype": args.dtype, "kv_cache_gib": args.kv_cache_gib,
            "input_len": args.input_len, "output_len": args.output_len,
            "client": "vllm bench serve" if client == "vllm" else "built-in (benchmarks/peers.py)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows, skipped = [], {}
    logs = Path(tempfile.mkdtemp(prefix="peers-"))
    for name in args.servers:
        for c, n in zip(args.concurrency, args.num_prompts):
            server = next(s for s in servers(args, model_dir, c) if s.name == name)
            if server.missing:
                skipped[name] = server.missing
                print(f"{name}: skipped, {server.missing}", flush=True)
                break
            print(f"{name} ({server.version}), c={c}, {n} requests ...", flush=True)
            proc = start(server, logs / f"{name}-c{c}.log")
            sampler = RssSampler(proc.pid)
            sampler.start()
            url = f"http://127.0.0.1:{server.port}"
            try:
                if client == "vllm":
                    res = run_vllm_bench(vllm_py, Path(args.peers_dir) / "vllm_cli.py", url, model_dir, args, c, n)
                else:
                    res = run_builtin(url, random_prompts(n, args.input_len, vocab, seed=c), args.output_len, c)
            finally:
                peak = sampler.stop()
                stop(proc)
            if name == "llama" and res["duration_s"]:
                res["output_tok_s"] = res["completed"] * args.output_len / res["duration_s"]
            row = {"server": name, "version": server.version, "concurrency": c, **res, "peak_rss_mib": peak}
            rows.append(row)
            print("  " + table([row], {}, meta).splitlines()[-3], flush=True)
    md = table(rows, skipped, meta)
    stem = "peers" if args.dtype == "float32" else "peers-bf16"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=1))
    png = plot(rows, out / f"{stem}.png")
    print(md)
    print(f"wrote {out / f'{stem}.md'}, {out / f'{stem}.json'}" + (f", {png}" if png else ""))
    if any(r["failed"] for r in rows):
        print(f"some requests failed: the servers' logs are in {logs}")
        return 1
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
