"""Pipelined (async) scheduling against a real block-manager process: what the overlap hides.

Runs the engine on the model with a ``python -m blockmgr`` service over ZeroMQ, once with
``--no-async-scheduling`` (each step's block-manager round trip before its forward pass) and once
pipelined (steady decode steps send the next step's request before the pass and read its reply
after it), alternating modes ``--repeats`` times. For each concurrency: ``c`` requests of
``--prompt-len`` tokens prefilled together, then ``--output-len`` tokens decoded greedily. Prints
per mode the median decode step and the median time a step spends blocked on the block manager
(the synchronous round trip, or the wait for the reply sent ahead), in milliseconds.

    python benchmarks/async_scheduling.py --num-threads 2

A step's own time only drops where the block manager's work runs on a core the forward pass does
not use: on a machine with as many cores as the executor has threads, the service's processing
takes its CPU time from the pass instead (the README's measurements).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.blockmgr_bench import block_manager_process  # noqa: E402
from benchmarks.settings import BenchmarkSettings  # noqa: E402
from blockmgr.settings import load, reuse, separated_list, setting  # noqa: E402
from executor.config import ExecutorSettings, ModelSettings  # noqa: E402


class AsyncSchedulingSettings(BenchmarkSettings):
    concurrency: separated_list(",", int) = setting([1, 16, 64], "requests decoded together")
    prompt_len: int = setting(128, "prompt tokens of each request", ge=1)
    output_len: int = setting(128, "output tokens of each request", ge=2)
    repeats: int = setting(2, "runs of each mode, alternated", ge=1)
    num_threads: int = reuse(ExecutorSettings, "num_threads", default=1,
                             description="torch CPU threads (1: what CI's 2 cores run)")
    block_size: int = reuse(ExecutorSettings, "block_size")
    dtype: Literal["float32", "bfloat16", "float16"] = reuse(ExecutorSettings, "dtype")
    model: str | None = reuse(ModelSettings, "model")


def timed_link(engine) -> list[float]:
    """Record the seconds each step waits on the block manager (``step`` or ``finish``)."""
    waits: list[float] = []
    for name in ("step", "finish"):
        call = getattr(engine.link, name)

        def timed(*args, _call=call, **kwargs):
            t0 = time.perf_counter()
            try:
                return _call(*args, **kwargs)
            finally:
                waits.append(time.perf_counter() - t0)

        setattr(engine.link, name, timed)
    return waits


def run(engine, prompt: list[int], concurrency: int, output_len: int, tag: str) -> tuple[float, float]:
    """Median decode step and median block-manager wait per step (seconds)."""
    from executor.request import SamplingParams

    waits = timed_link(engine)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    for i in range(concurrency):
        engine.add_request(f"{tag}-{i}", prompt, params)
    while any(r.num_computed_tokens < len(prompt) for r in engine.requests.values()):
        engine.step()  # prefill (chunked by the token budget)
    waits.clear()
    steps = []
    while engine.has_work():
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    return statistics.median(steps), statistics.median(waits)


def main(argv: list[str] | None = None) -> None:
    args, _ = load(AsyncSchedulingSettings, argv, "async_scheduling.py", __doc__.split("\n\n")[0])
    import torch

    from executor.engine import Engine, EngineConfig
    from executor.model_loader import default_model_path, load_model, resolve_model_dir
    from transformers import AutoTokenizer

    torch.set_num_threads(args.num_threads)
    model_dir = resolve_model_dir(args.model or default_model_path())
    model = load_model(model_dir, dtype=getattr(torch, args.dtype))
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "The quick brown fox jumps over the lazy dog. "
    prompt = (tok.encode(text) * args.prompt_len)[: args.prompt_len]
    with block_manager_process() as client:
        print(f"# {args.dtype}, {args.num_threads} torch thread(s), {os.cpu_count()} cores seen; prompt "
              f"{args.prompt_len} tokens, {args.output_len} out; per mode: median decode step / median wait on "
              f"the block manager per step, ms")
        blocks = max(args.concurrency) * -(-(args.prompt_len + args.output_len) // args.block_size) + 8
        for c in args.concurrency:
            line = {True: [], False: []}
            for rep in range(args.repeats):
                for pipelined in (False, True):
                    config = EngineConfig(block_size=args.block_size, num_blocks=blocks, async_scheduling=pipelined)
                    engine = Engine(model, client, config, {tok.eos_token_id}, executor_id=f"bench-{c}-{rep}-{pipelined}")
                    step, wait = run(engine, prompt, c, args.output_len, f"{c}-{rep}")
                    line[pipelined].append(f"{step * 1e3:.2f} / {wait * 1e3:.3f}")
            print(f"c={c}: one at a time {', '.join(line[False])}; pipelined {', '.join(line[True])}", flush=True)


if __name__ == "__main__":
    main()
