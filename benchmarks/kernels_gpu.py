#!/usr/bin/env python3
"""GPU check and figures for the Triton PagedAttention kernels, in one run (< 5 minutes).

1. Checks every Triton kernel against its plain-torch twin on the GPU (fp32 and bf16/fp16):
   ``write_kv_cache``, ``paged_decode_attention`` (auto, single-pass and split-K),
   ``paged_extend_attention``, ``copy_blocks``, ``swap_blocks`` (GPU->GPU, GPU->CPU, CPU->GPU).
2. Prints the decode kernel's achieved memory bandwidth for the SmolLM2 shape (9 query heads,
   3 KV heads, head_dim 64, block_size 16) at batch 1..256 and context 128..32k, for both paths,
   beside a plain device-to-device copy (``dst.copy_(src)``) of the same number of bytes measured
   in the same run. Bytes counted: K/V read + query read + output written. Times are the median of
   CUDA-event timings, after warmup, with the L2 cache flushed before every timed call.
3. Prints one prefill (extend) throughput figure.

Usage::

    python benchmarks/kernels_gpu.py                 # on a CUDA machine
    python benchmarks/kernels_gpu.py --device cpu    # tiny dry run under the Triton interpreter

Exit status: 0 all checks passed; 1 a check failed; 2 no CUDA device (without ``--device cpu``).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

from typing import Literal

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from benchmarks.settings import BenchmarkSettings  # noqa: E402  (imports no kernels: TRITON_INTERPRET comes first)
from blockmgr.settings import load, separated_list, setting  # noqa: E402

# SmolLM2-135M attention shape.
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16


class KernelsGpuSettings(BenchmarkSettings):
    device: Literal["cuda", "cpu"] = setting("cuda", "cpu: a tiny dry run under TRITON_INTERPRET=1")
    dry_run: bool = setting(False, "same as --device cpu")
    dtype: Literal["bf16", "fp16"] = setting("bf16", "cache dtype for the figures")
    batches: separated_list(",", int) = setting(help="batch sizes (default 1 4 16 64 256)", default_factory=list)
    contexts: separated_list(",", int) = setting(help="context lengths (default 128 512 ... 32768)",
                                                 default_factory=list)
    time_budget: float = setting(200.0, "seconds after which remaining benchmark rows are skipped", gt=0)
    skip_checks: bool = setting(False, "skip the kernel checks")
    skip_bench: bool = setting(False, "skip the figures")


def parse_args(argv: list[str] | None) -> KernelsGpuSettings:
    args = load(KernelsGpuSettings, argv, "kernels_gpu.py", __doc__.split("\n\n")[0])[0]
    return args.model_copy(update={"device": "cpu"}) if args.dry_run else args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # Must precede the first import of the kernels' Triton modules.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "kernels_gpu.py: no CUDA device is available. This script checks and times the Triton "
            "kernels on a GPU; run it on a CUDA machine, or use --device cpu for a tiny dry run under "
            "the Triton interpreter.",
            file=sys.stderr,
        )
        return 2
    import triton

    import kernels

    if args.device == "cpu" and not kernels.triton_interpreted():
        print("kernels_gpu.py: --device cpu needs the Triton interpreter, but the kernels were compiled", file=sys.stderr)
        return 1

    t_start = time.monotonic()
    device = torch.device(args.device)
    small = device.type == "cpu"
    print(f"torch {torch.__version__}, triton {triton.__version__}, device {device}", end="")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f" ({props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)")
    else:
        print(" (Triton interpreter: correctness only, timings meaningless)")
    # bf16 tl.dot is unsupported by the Triton interpreter (triton-lang/triton#11584): fp16 on CPU.
    low = torch.float16 if (args.dtype == "fp16" or small) else torch.bfloat16

    failures: list[str] = []
    if not args.skip_checks:
        torch.manual_seed(0)
        for dtype in (torch.float32, low):
            failures += run_checks(torch, kernels, device, dtype, small)
        print(f"checks: {'all passed' if not failures else f'{len(failures)} FAILED: ' + ', '.join(failures)}"
              f" ({time.monotonic() - t_start:.1f} s)")
    if not args.skip_bench:
        batches = args.batches or ([1, 2] if small else [1, 4, 16, 64, 256])
        contexts = args.contexts or ([16, 48] if small else [128, 512, 2048, 8192, 32768])
        run_decode_bench(torch, kernels, device, low, batches, contexts, t_start, args.time_budget)
        run_extend_bench(torch, kernels, device, low, small)
    print(f"total {time.monotonic() - t_start:.1f} s")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------
# Checks


def _tolerance(torch, dtype) -> float:
    return {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


def _report(name: str, err: float, tol: float, extra: str = "") -> list[str]:
    ok = err <= tol  # NaN fails
    print(f"  {'PASS' if ok else 'FAIL'} {name}: max err {err:.3g} (tol {tol:g}){extra}")
    return [] if ok else [name]


def _paged_inputs(torch, device, dtype, seq_lens: list[int], num_blocks: int):
    """Random caches, shuffled non-contiguous block tables, int32 seq_lens."""
    max_blocks = max(math.ceil(n / BLOCK_SIZE) for n in seq_lens) + 1
    needed = sum(math.ceil(n / BLOCK_SIZE) for n in seq_lens)
    assert needed <= num_blocks, (needed, num_blocks)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, device=device).to(dtype)
    value_cache = torch.randn(shape, device=device).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    table = torch.zeros((len(seq_lens), max_blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(seq_lens):
        nb = math.ceil(n / BLOCK_SIZE)
        table[i, :nb] = torch.tensor(perm[used : used + nb], dtype=torch.int32)
        used += nb
    return key_cache, value_cache, table.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device)


def run_checks(torch, kernels, device, dtype, small: bool) -> list[str]:
    name = str(dtype).replace("torch.", "")
    print(f"checks ({name}):")
    tol = _tolerance(torch, dtype)
    scale = HEAD_DIM**-0.5
    failures: list[str] = []
    lens = [1, 15, 16, 17, 70] if small else [1, 15, 16, 17, 300, 1000, 5000]
    num_blocks = sum(math.ceil(n / BLOCK_SIZE) for n in lens) + 7
    kc, vc, table, seq_lens = _paged_inputs(torch, device, dtype, lens, num_blocks)

    # write_kv_cache: the last token of each sequence, plus padding (negative) slots; bit-exact.
    slots = [int(table[i, (n - 1) // BLOCK_SIZE]) * BLOCK_SIZE + (n - 1) % BLOCK_SIZE for i, n in enumerate(lens)]
    slot_mapping = torch.tensor(slots + [-1, -5], dtype=torch.int64, device=device)
    key = torch.randn((len(slots) + 2, NUM_KV_HEADS, HEAD_DIM), device=device).to(dtype)
    value = torch.randn_like(key)
    kc_t, vc_t, kc_r, vc_r = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    kernels.write_kv_cache(key, value, kc_t, vc_t, slot_mapping)
    kernels.write_kv_cache_torch(key, value, kc_r, vc_r, slot_mapping)
    err = max((kc_t.float() - kc_r.float()).abs().max().item(), (vc_t.float() - vc_r.float()).abs().max().item())
    failures += _report(f"write_kv_cache[{name}]", err, 0.0)

    # Decode: all three paths against the twin on fp32 copies of the same data.
    query = torch.randn((len(lens), NUM_HEADS, HEAD_DIM), device=device).to(dtype)
    ref = kernels.paged_decode_attention_torch(query.float(), kc.float(), vc.float(), table, seq_lens, scale)
    twin = kernels.paged_decode_attention_torch(query, kc, vc, table, seq_lens, scale)
    twin_err = f", twin err {(twin.float() - ref).abs().max().item():.3g}"
    for label, split in (("auto", None), ("single-pass", False), ("split-k", True)):
        kwargs = {"split_k": split}
        if small and split:
            kwargs["partition_size"] = 32
            kwargs["block_n"] = 16
        out = kernels.paged_decode_attention(query, kc, vc, table, seq_lens, scale, **kwargs)
        err = (out.float() - ref).abs().max().item()
        failures += _report(f"paged_decode_attention {label}[{name}]", err, tol, twin_err)

    # Extend: mixed query lengths (whole sequence, 1 token, chunks) in one launch.
    q_lens = [1, 15, 3, 17, 64] if small else [1, 15, 3, 17, 300, 200, 64]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    q = torch.randn((starts[-1], NUM_HEADS, HEAD_DIM), device=device).to(dtype)
    ref = kernels.paged_extend_attention_torch(q.float(), kc.float(), vc.float(), table, query_start_loc, seq_lens, scale)
    twin = kernels.paged_extend_attention_torch(q, kc, vc, table, query_start_loc, seq_lens, scale)
    out = kernels.paged_extend_attention(q, kc, vc, table, query_start_loc, seq_lens, scale)
    err = (out.float() - ref).abs().max().item()
    failures += _report(f"paged_extend_attention[{name}]", err, tol, f", twin err {(twin.float() - ref).abs().max().item():.3g}")

    # copy_blocks over two layers; bit-exact.
    mapping = torch.tensor([[0, num_blocks - 1], [3, num_blocks - 2], [5, num_blocks - 3]], dtype=torch.int64)
    layers_t = [kc.clone(), kc.clone() * 2], [vc.clone(), vc.clone() * 2]
    layers_r = [x.clone() for x in layers_t[0]], [x.clone() for x in layers_t[1]]
    kernels.copy_blocks(*layers_t, mapping)
    kernels.copy_blocks_torch(*layers_r, mapping)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(sum(layers_t, []), sum(layers_r, [])))
    failures += _report(f"copy_blocks[{name}]", err, 0.0)

    # swap_blocks: same device, and across devices when on CUDA; bit-exact.
    pairs = [("same-device", device, device)]
    if device.type == "cuda":
        pairs += [("swap-out gpu->cpu", device, torch.device("cpu")), ("swap-in cpu->gpu", torch.device("cpu"), device)]
    for label, src_dev, dst_dev in pairs:
        src = kc.to(src_dev)
        dst_t = torch.zeros((9, *kc.shape[1:]), dtype=dtype, device=dst_dev)
        dst_r = dst_t.clone()
        swap_map = torch.tensor([[2, 8], [num_blocks - 1, 0], [4, 3]], dtype=torch.int64)
        kernels.swap_blocks(src, dst_t, swap_map)
        kernels.swap_blocks_torch(src, dst_r, swap_map)
        err = (dst_t.float() - dst_r.float()).abs().max().item()
        failures += _report(f"swap_blocks {label}[{name}]", err, 0.0)
    return failures


# --------------------------------------------------------------------------------------------
# Timing


class _Timer:
    """Median time of ``fn`` in ms: CUDA events with an L2 flush before each call, or wall time."""

    def __init__(self, torch, device):
        self.torch = torch
        self.cuda = device.type == "cuda"
        # 256 MiB: several times the H100/H200 L2 (50 MB).
        self.flush = torch.empty(64 * 2**20, dtype=torch.int32, device=device) if self.cuda else None

    def __call__(self, fn, warmup: int = 3, target_ms: float = 40.0, max_iters: int = 100) -> float:
        torch = self.torch
        if not self.cuda:
            fn()
            times = []
            for _ in range(2):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        iters = max(5, min(max_iters, int(target_ms / max(start.elapsed_time(end), 1e-3))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for s, e in events:
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def run_decode_bench(torch, kernels, device, dtype, batches, contexts, t_start, budget_s) -> None:
    from kernels.decode_attention import partition_size_for

    elsize = torch.empty((), dtype=dtype).element_size()
    bytes_per_token = 2 * NUM_KV_HEADS * HEAD_DIM * elsize  # K and V
    combos = [(b, c) for b in batches for c in contexts]
    max_tokens = max(b * math.ceil(c / BLOCK_SIZE) * BLOCK_SIZE for b, c in combos)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # K/V pools + copy src and dst of the same size: 3 x bytes_per_token per token, in 60% of free.
        fit = int(0.6 * free) // (3 * bytes_per_token)
        max_tokens = min(max_tokens, fit // BLOCK_SIZE * BLOCK_SIZE)
    pool_blocks = max_tokens // BLOCK_SIZE
    shape = (pool_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_pool = torch.empty(shape, dtype=dtype, device=device).normal_()
    value_pool = torch.empty(shape, dtype=dtype, device=device).normal_()
    copy_src = torch.empty(max_tokens * bytes_per_token // elsize, dtype=dtype, device=device).normal_()
    copy_dst = torch.empty_like(copy_src)
    timer = _Timer(torch, device)
    scale = HEAD_DIM**-0.5
    dname = str(dtype).replace("torch.", "")
    print(f"\ndecode bandwidth, {dname} caches, heads {NUM_HEADS}/{NUM_KV_HEADS}, head_dim {HEAD_DIM}, "
          f"block_size {BLOCK_SIZE}; GB/s = (K/V + query + output bytes) / time; copy GB/s = 2 x bytes / time")
    print(f"{'batch':>6} {'context':>8} {'auto':>7} {'parts':>5} {'single GB/s':>12} {'split GB/s':>11} "
          f"{'copy GB/s':>10} {'auto/copy':>10} {'auto us':>9}")
    for batch, ctx in combos:
        if time.monotonic() - t_start > budget_s:
            print(f"{batch:>6} {ctx:>8}  skipped: time budget ({budget_s:.0f} s) spent")
            continue
        blocks_per_seq = math.ceil(ctx / BLOCK_SIZE)
        if batch * blocks_per_seq > pool_blocks:
            print(f"{batch:>6} {ctx:>8}  skipped: cache would not fit in GPU memory")
            continue
        ids = torch.randperm(pool_blocks, device=device)[: batch * blocks_per_seq]
        table = ids.view(batch, blocks_per_seq).to(torch.int32)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        query = torch.randn((batch, NUM_HEADS, HEAD_DIM), device=device).to(dtype)
        auto = kernels.use_split_k(batch, NUM_KV_HEADS, blocks_per_seq * BLOCK_SIZE, device)
        parts = math.ceil(blocks_per_seq * BLOCK_SIZE / partition_size_for(blocks_per_seq * BLOCK_SIZE))
        nbytes = batch * ctx * bytes_per_token + 2 * batch * NUM_HEADS * HEAD_DIM * elsize
        ms = {}
        for split in (False, True):
            ms[split] = timer(lambda: kernels.paged_decode_attention(
                query, key_pool, value_pool, table, seq_lens, scale, split_k=split))  # fmt: skip
        n = nbytes // elsize
        src, dst = copy_src[:n], copy_dst[:n]
        copy_ms = timer(lambda: dst.copy_(src))
        gbs = {k: nbytes / (v * 1e-3) / 1e9 for k, v in ms.items()}
        copy_gbs = 2 * n * elsize / (copy_ms * 1e-3) / 1e9
        print(f"{batch:>6} {ctx:>8} {'split' if auto else 'single':>7} {parts:>5} {gbs[False]:>12.1f} "
              f"{gbs[True]:>11.1f} {copy_gbs:>10.1f} {gbs[auto] / copy_gbs:>9.0%} {ms[auto] * 1e3:>9.1f}")


def run_extend_bench(torch, kernels, device, dtype, small: bool) -> None:
    batch, q_len = (2, 32) if small else (8, 2048)
    blocks_per_seq = math.ceil(q_len / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kc = torch.randn(shape, device=device).to(dtype)
    vc = torch.randn(shape, device=device).to(dtype)
    table = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), q_len, dtype=torch.int32, device=device)
    qsl = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=device)
    q = torch.randn((batch * q_len, NUM_HEADS, HEAD_DIM), device=device).to(dtype)
    timer = _Timer(torch, device)
    ms = timer(lambda: kernels.paged_extend_attention(
        q, kc, vc, table, qsl, seq_lens, HEAD_DIM**-0.5, max_query_len=q_len))  # fmt: skip
    # Causal: about half of QK^T and PV; 2 FLOPs per multiply-add, two products.
    flops = batch * NUM_HEADS * (q_len * (q_len + 1) / 2) * HEAD_DIM * 2 * 2
    print(f"\nprefill (extend) {batch} x {q_len} tokens, {str(dtype).replace('torch.', '')}: "
          f"{ms * 1e3:.0f} us, {flops / (ms * 1e-3) / 1e12:.1f} TFLOP/s")


if __name__ == "__main__":
    sys.exit(main())
