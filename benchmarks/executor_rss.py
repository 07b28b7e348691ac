#!/usr/bin/env python3
"""Resident memory of an executor, stage by stage: imports, model loaded, KV pools, one request.

Builds what ``python -m executor`` builds (SmolLM2-135M-Instruct, fp32, CPU; ``--kv-cache-gib``
of KV blocks and ``--swap-space`` GiB of CPU swap blocks, as the executor's flags of those names)
with an in-process block manager, runs one request of ``--prompt-len`` tokens, and prints
``VmRSS`` (``/proc/self/status``) after each stage, with the parameters' own size for comparison.

Usage::

    python benchmarks/executor_rss.py                      # 1 GiB KV, 0.5 GiB swap: the defaults
    python benchmarks/executor_rss.py --repo /tmp/old      # another checkout, same settings
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the settings classes come from this checkout

from benchmarks.settings import BenchmarkSettings, import_from  # noqa: E402
from blockmgr.settings import load, reuse, setting  # noqa: E402
from executor.config import ExecutorSettings  # noqa: E402


class ExecutorRssSettings(BenchmarkSettings):
    kv_cache_gib: float = reuse(ExecutorSettings, "kv_cache_gib")
    swap_space: float = reuse(ExecutorSettings, "swap_space")
    prompt_len: int = setting(128, "prompt tokens of the one request", ge=1)
    block_size: int = reuse(ExecutorSettings, "block_size")
    repo: str = setting(str(REPO), "the pagedserve checkout to import")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main(argv=None) -> int:
    args, _ = load(ExecutorRssSettings, argv, "executor_rss.py", __doc__.split("\n\n")[0])
    import_from(args.repo)
    import torch

    torch.set_num_threads(1)
    from blockmgr.client import InProcessBlockManager
    from blockmgr.manager import BlockManager
    from executor.engine import Engine, EngineConfig
    from executor.model_loader import default_model_path, load_model, resolve_model_dir
    from executor.request import SamplingParams
    from executor.server import kv_bytes_per_block

    print(f"imports: {rss_mib():.0f} MiB")
    model = load_model(resolve_model_dir(default_model_path()), progress=False)
    weights = {id(t): t.numel() * t.element_size() for t in model.parameters()}  # tied: counted once
    print(f"model loaded: {rss_mib():.0f} MiB (parameters {sum(weights.values()) / 2**20:.0f} MiB)")
    per_block = kv_bytes_per_block(model, args.block_size, torch.float32)
    # Keywords only: an older checkout's EngineConfig takes them too.
    cfg = EngineConfig(block_size=args.block_size, num_blocks=int(args.kv_cache_gib * 2**30 // per_block),
                       num_cpu_blocks=int(args.swap_space * 2**30 // per_block))
    engine = Engine(model, InProcessBlockManager(BlockManager()), cfg, eos_token_ids=set())
    print(f"KV pools ({args.kv_cache_gib} GiB + {args.swap_space} GiB swap): {rss_mib():.0f} MiB")
    engine.add_request("r0", list(range(1000, 1000 + args.prompt_len)),
                       SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    while not any(o.finished for o in engine.step()):
        pass
    print(f"after one request ({args.prompt_len} in, 16 out): {rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
