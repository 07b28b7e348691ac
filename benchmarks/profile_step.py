#!/usr/bin/env python3
"""Where a CPU decode step's time goes: matmuls, attention, other model ops, sampling, engine.

Runs SmolLM2-135M-Instruct (fp32 unless ``--dtype``, CPU) in an :class:`executor.engine.Engine` with an in-process
block manager, fills it with ``B`` requests of ``--prompt-len`` random prompt tokens, lets them
reach steady decoding, then

1. times ``--steps`` decode steps without a profiler (the step times to quote), and
2. profiles as many steps with ``torch.profiler`` (through the Python layer loop: the compiled one
   of :mod:`executor.decoder_cpu`, which the timed steps use, makes the same kernel calls from C,
   out of the profiler's sight) and splits each step's time into exclusive parts: the code under each of these ranges, which the script marks with ``record_function``
   (monkeypatched, so the engine itself carries no profiling code):

   - ``matmul``: every linear layer (q/k/v, o, gate/up, down) and the LM head;
   - ``attention``: the KV-cache write and paged attention of every layer;
   - ``model (other)``: the rest of the forward pass: embedding, RMSNorms, RoPE, SiLU, residuals;
   - ``sampling``: the sampler, stop checks and output objects;
   - ``block manager``: the per-step round trip to the (in-process) block manager;
   - ``engine``: everything else in ``Engine.step``: scheduling, building the batch's
     input tensors and attention metadata.

   Each part is further split into time inside torch operators (``aten::``/``mkldnn::`` ops, the
   work itself plus torch's C++ dispatch) and time between them (Python: the interpreter running our
   code, and the Python side of each torch call).

3. times the same steps on a "hollow" model: the same architecture (30 layers, 9 query and 3 KV
   heads, the vocabulary) with hidden size 72 instead of 576, so that every operator is called
   exactly as often but computes almost nothing. Its step time is the engine's fixed cost per
   step: Python, torch dispatch and operator launch overhead, without the profiler's distortion.

The profiler's own cost (a few microseconds per operator) lands in the "between ops" column;
compare with the hollow model's step time for an undistorted figure of the overhead.

Usage::

    python benchmarks/profile_step.py                       # batch 1 and 16, 1 thread
    python benchmarks/profile_step.py --batch-sizes 1 4 16 64 --prompt-len 512 --num-threads 2
    python benchmarks/profile_step.py --dtype bfloat16 --num-threads 2   # weights and KV cache in bf16
    python benchmarks/profile_step.py --trace /tmp/trace    # also writes Chrome traces
    # step times of another checkout (say the commit before these changes), same settings:
    git archive 13482c8 | (mkdir -p /tmp/old && tar -x -C /tmp/old)
    python benchmarks/profile_step.py --time-only --repo /tmp/old

"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the settings classes come from this checkout

from benchmarks.settings import BenchmarkSettings, import_from  # noqa: E402
from blockmgr.settings import load, reuse, separated_list, setting  # noqa: E402
from executor.config import ExecutorSettings, ModelSettings  # noqa: E402

CATEGORIES = ("matmul", "attention", "model (other)", "sampling", "block manager", "engine")
_RANGE_OF = {"ps:matmul": "matmul", "ps:attention": "attention", "ps:model": "model (other)",
             "ps:sampling": "sampling", "ps:block_manager": "block manager", "ps:step": "engine"}


class ProfileStepSettings(BenchmarkSettings):
    batch_sizes: separated_list(",", int) = setting([1, 16], "decode batch sizes")
    prompt_len: int = setting(128, "prompt tokens of each sequence", ge=1)
    steps: int = setting(20, "decode steps timed, and as many profiled", ge=1)
    warmup: int = setting(5, "decode steps before the timed ones", ge=0)
    num_threads: int = reuse(ExecutorSettings, "num_threads", default=1,
                             description="torch CPU threads (1: what CI's 2 cores run)")
    block_size: int = reuse(ExecutorSettings, "block_size")
    dtype: Literal["float32", "bfloat16", "float16"] = reuse(ExecutorSettings, "dtype")
    model: str | None = reuse(ModelSettings, "model")
    trace: str | None = setting(None, "directory for Chrome traces (one per batch size)")
    hollow: bool = setting(True, "skip the hollow-model overhead measurement", flag="--no-hollow")
    time_only: bool = setting(False, "only time the decode steps, and the hollow model unless --no-hollow (no "
                                     "profile)")
    repo: str = setting(str(REPO), "the pagedserve checkout to import")


def parse_args(argv):
    return load(ProfileStepSettings, argv, "profile_step.py", __doc__.split("\n\n")[0])[0]


def instrument(engine):
    """Wrap the parts of a step in record_function ranges; returns an undo function."""
    import torch
    from torch.profiler import record_function

    import executor.engine as engine_mod
    import executor.model as model_mod

    try:
        import executor.layers as layers_mod
    except ImportError:  # an older checkout (see --repo): the layers lived in executor.model
        layers_mod = model_mod

    saved = []

    def wrap(owner, name, label):
        if not hasattr(owner, name):  # an older checkout (see --repo) may lack it
            return
        own = vars(owner).get(name)  # None where the attribute comes from a class
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            with record_function(label):
                return original(*args, **kwargs)

        saved.append((owner, name, own))
        setattr(owner, name, wrapped)

    wrap(getattr(model_mod, "Linear", torch.nn.Linear), "forward", "ps:matmul")
    wrap(layers_mod, "paged_attention", "ps:attention")
    wrap(model_mod.LlamaForCausalLM, "forward", "ps:model")
    wrap(engine_mod, "sample_with_logprobs", "ps:sampling")
    wrap(engine_mod, "sample", "ps:sampling")
    wrap(engine_mod.Engine, "_sample_and_append", "ps:sampling")
    wrap(engine.bm, "step", "ps:block_manager")
    wrap(engine, "step", "ps:step")
    try:  # the compiled layer loop would hide the parts: profile the same kernel calls made from Python
        import executor.decoder_cpu as decoder_mod
    except ImportError:  # an older checkout (see --repo)
        decoder_mod = None
    if decoder_mod is not None:
        saved.append((decoder_mod, "for_step", decoder_mod.for_step))
        decoder_mod.for_step = lambda *args: None

    def undo():
        for owner, name, own in reversed(saved):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)

    return undo


def split_profile(prof, num_steps: int) -> tuple[dict, dict, dict, float]:
    """Per step and category: ms inside torch ops, ms between them, op calls; and the step total."""
    ops = defaultdict(float)
    gaps = defaultdict(float)
    calls = defaultdict(int)
    total = 0.0
    for ev in prof.events():
        category = _RANGE_OF.get(ev.name)
        if category is None:
            continue
        duration = ev.time_range.elapsed_us()
        if ev.name == "ps:step":
            total += duration
        children = [c for c in ev.cpu_children if c.name not in _RANGE_OF]
        inner_ranges = sum(c.time_range.elapsed_us() for c in ev.cpu_children if c.name in _RANGE_OF)
        inner_ops = sum(c.time_range.elapsed_us() for c in children)
        ops[category] += inner_ops
        calls[category] += len(children)
        gaps[category] += duration - inner_ranges - inner_ops
    scale = 1e-3 / num_steps
    return ({k: v * scale for k, v in ops.items()}, {k: v * scale for k, v in gaps.items()},
            {k: v / num_steps for k, v in calls.items()}, total * scale)


def main(argv=None) -> int:
    args = parse_args(argv)
    import_from(args.repo)
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.num_threads)
    from blockmgr.client import InProcessBlockManager
    from blockmgr.manager import BlockManager
    from executor.engine import Engine, EngineConfig
    from executor.model_loader import default_model_path, load_model, resolve_model_dir
    from executor.request import SamplingParams

    dtype = getattr(torch, args.dtype)
    model = load_model(resolve_model_dir(args.model or default_model_path()), dtype=dtype)
    try:
        from executor.linear import linear_path
        path = linear_path(dtype)
    except ImportError:  # an older checkout (see --repo)
        path = "this checkout's Linear"
    try:
        from kernels import decoder_cpu
        loop = ("one C call per step (kernels.decoder_cpu) where it runs, else the Python loop"
                if decoder_cpu.backend() == "compiled" else "the Python loop (PAGEDSERVE_DECODER_CPU=torch)")
    except ImportError:  # an older checkout (see --repo)
        loop = "the Python loop"
    print(f"# SmolLM2 decode step on the CPU: torch {torch.__version__}, {args.dtype} (linear layers: {path}), "
          f"decoder layers: {loop}; {args.num_threads} thread(s), prompt {args.prompt_len} tokens, block size {args.block_size}, "
          f"{os.cpu_count()} cores seen, code from {args.repo}")
    gen = torch.Generator().manual_seed(0)
    results = []
    for batch in args.batch_sizes:
        total_tokens = args.prompt_len + args.warmup + 2 * args.steps + 2
        blocks = batch * -(-total_tokens // args.block_size) + 8
        try:
            bm = BlockManager(enable_prefix_caching=False)
        except TypeError:  # an older block manager, without prefix caching
            bm = BlockManager()
        engine = Engine(model, InProcessBlockManager(bm),
                        EngineConfig(block_size=args.block_size, num_blocks=blocks, max_num_seqs=max(batch, 1),
                                     max_num_batched_tokens=max(2048, batch * args.prompt_len)),
                        eos_token_ids=set(), dtype=dtype)
        params = SamplingParams(max_tokens=args.warmup + 2 * args.steps + 2, temperature=0, ignore_eos=True)
        for i in range(batch):
            prompt = torch.randint(100, model.vocab_size, (args.prompt_len,), generator=gen).tolist()
            engine.add_request(f"r{i}", prompt, params)
        engine.step()  # the prefill
        for _ in range(args.warmup):
            engine.step()
        times, cpu_times = [], []
        for _ in range(args.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            outs = engine.step()
            times.append((time.perf_counter() - t0) * 1e3)
            cpu_times.append((time.process_time() - c0) * 1e3)
            assert len(outs) == batch
        if args.time_only:
            # CPU time (all threads of the process) is what a loaded machine distorts least.
            print(f"batch {batch}: {statistics.median(times):.1f} ms per decode step "
                  f"(median of {args.steps}; min {min(times):.1f}); CPU time median "
                  f"{statistics.median(cpu_times):.1f} ms, lower quartile {statistics.quantiles(cpu_times, n=4)[0]:.1f}")
            continue
        undo = instrument(engine)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    engine.step()
        finally:
            undo()
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(args.trace) / f"decode_b{batch}.json"))
        results.append((batch, statistics.median(times), *split_profile(prof, args.steps)))

    hollow = hollow_step_times(model.config, args) if args.hollow else {}
    if args.time_only:
        for batch, ms in hollow.items():
            print(f"batch {batch}: hollow model {ms:.1f} ms per step")
        return 0
    for batch, median, ops, gaps, calls, profiled in results:
        print(f"\n## batch {batch}: {median:.1f} ms per decode step (median of {args.steps}, unprofiled; "
              f"{profiled:.1f} ms profiled)\n")
        print("| part | in torch ops (ms) | between ops (ms) | share of profiled step | op calls |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for cat in CATEGORIES:
            o, g = ops.get(cat, 0.0), gaps.get(cat, 0.0)
            print(f"| {cat} | {o:.1f} | {g:.1f} | {100 * (o + g) / profiled:.0f}% | {calls.get(cat, 0):.0f} |")
        o, g = sum(ops.values()), sum(gaps.values())
        print(f"| **step** | {o:.1f} | {g:.1f} | {100 * (o + g) / profiled:.0f}% | {sum(calls.values()):.0f} |")
        if batch in hollow:
            print(f"\nHollow model (same operator calls, hidden size 72): {hollow[batch]:.1f} ms per step "
                  f"= {100 * hollow[batch] / median:.0f}% of the real step.")
    return 0


def hollow_step_times(config, args) -> dict[int, float]:
    """Median decode step (ms) of a model with ``config``'s structure but hidden size 72."""
    import copy

    import torch

    from blockmgr.client import InProcessBlockManager
    from blockmgr.manager import BlockManager
    from executor.engine import Engine, EngineConfig
    from executor.model import LlamaForCausalLM
    from executor.request import SamplingParams

    cfg = copy.deepcopy(config)
    heads = cfg.num_attention_heads
    cfg.hidden_size = 8 * heads
    cfg.head_dim = 8
    cfg.intermediate_size = 64
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    if hasattr(model, "pack_weights"):  # as load_model leaves a model: packed, plain weights dropped
        model.pack_weights(keep_plain=False)
    out = {}
    for batch in args.batch_sizes:
        try:
            bm = BlockManager(enable_prefix_caching=False)
        except TypeError:  # an older block manager, without prefix caching
            bm = BlockManager()
        engine = Engine(model, InProcessBlockManager(bm),
                        EngineConfig(block_size=args.block_size, num_blocks=batch * 64 + 8,
                                     max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * args.prompt_len)),
                        eos_token_ids=set(), dtype=dtype)
        params = SamplingParams(max_tokens=args.warmup + args.steps + 2, temperature=0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"h{i}", [100 + (i + j) % 1000 for j in range(args.prompt_len)], params)
        for _ in range(1 + args.warmup):
            engine.step()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            times.append((time.perf_counter() - t0) * 1e3)
        out[batch] = statistics.median(times)
    return out


if __name__ == "__main__":
    sys.exit(main())
