"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed).

matplotlib is the optional extra ``pagedserve[bench]``; :func:`missing` lets the CLI say so before
a run of minutes rather than after it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


INSTALL_HINT = "plots need matplotlib: pip install 'pagedserve[bench]' (or pass --no-plots)"


def missing() -> str | None:
    """None when matplotlib imports; otherwise :data:`INSTALL_HINT`."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def memory_over_time(runs: list[dict], path: Path) -> Path:
    """KV blocks in use against time, one line per offline run; dashed: the same without sharing."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        tl = run.get("timeline") or []
        if not tl:
            continue
        t = [s["t"] for s in tl]
        (line,) = ax.plot(t, [s["used_blocks"] for s in tl], label=f"{run['workload']} (used)")
        if run.get("sharing_savings", 0) > 0.001:
            ax.plot(t, [s["unshared_blocks"] for s in tl], "--", color=line.get_color(),
                    label=f"{run['workload']} (without sharing)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV blocks in use")
    ax.set_title("KV cache memory over time (offline runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def throughput_bars(ours: list[dict], hf: list[dict], path: Path) -> Path:
    """Output tokens/s of our engine and of HF static batching (each batch size), per workload."""
    plt = _plt()
    labels, values, colors = [], [], []
    for run in ours:
        labels.append(f"ours\n{run['workload']}")
        values.append(run["output_tokens_per_s"])
        colors.append("tab:blue")
    for run in hf:
        labels.append(f"HF bs={run['batch_size']}\n{run['workload']}")
        values.append(run["output_tokens_per_s"])
        colors.append("tab:orange")
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels)), 4))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Offline throughput: pagedserve vs HF static batching")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def throughput_vs_rate(runs: list[dict], path: Path) -> Path:
    """Output tokens/s against the offered request rate (``inf`` drawn at the right end)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    by_workload: dict[str, list[dict]] = {}
    for r in runs:
        by_workload.setdefault(r.get("label", r["workload"]), []).append(r)
    finite = [r["request_rate"] for r in runs if np.isfinite(r["request_rate"])]
    inf_x = (max(finite) * 1.5) if finite else 1.0
    for name, rs in by_workload.items():
        rs = sorted(rs, key=lambda r: r["request_rate"])
        xs = [r["request_rate"] if np.isfinite(r["request_rate"]) else inf_x for r in rs]
        ax.plot(xs, [r["output_tokens_per_s"] for r in rs], "o-", label=name)
    ax.set_xlabel("request rate (requests/s; rightmost point: all at once)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Online throughput against request rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def latency_cdfs(runs: list[dict], path: Path) -> Path:
    """Empirical CDFs of TTFT, ITL and end-to-end latency, one line per (workload, rate)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for run in runs:
        ok = [r for r in run["requests"] if r["error"] is None]
        label = f"{run.get('label', run['workload'])} @ {run['request_rate']}/s"
        series = {
            "TTFT (s)": [r["ttft_s"] for r in ok if r["ttft_s"] is not None],
            "ITL (s)": [g for r in ok for g in r["itl_s"]],
            "end-to-end (s)": [r["e2e_s"] for r in ok if r["e2e_s"] is not None],
        }
        for ax, (name, vals) in zip(axes, series.items()):
            if vals:
                v = np.sort(vals)
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
            ax.set_xlabel(name)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle("Latency CDFs (online benchmark)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def offline_latency_cdfs(runs: list[dict], path: Path) -> Path:
    """CDFs of completion time (all requests submitted at 0) for our engine and HF static batching."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        vals = [v for v in run.get("e2e_s", []) if v is not None]
        if not vals:
            continue
        v = np.sort(vals)
        name = run["system"] + (f" bs={run['batch_size']}" if "batch_size" in run else "")
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=f"{name} ({run['workload']})")
    ax.set_xlabel("request completion time (s, all submitted at 0)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Offline completion-time CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
