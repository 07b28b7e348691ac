"""Start-up measurements the block manager's swap-or-recompute decision needs.

See ``blockmgr.preemption`` for the cost model. Each probe takes a fraction of a second.
"""

from __future__ import annotations

import time

import torch


def _timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cost_model(model, device: torch.device, bytes_per_block: int) -> dict:
    """Measure device<->CPU copy bandwidth (bytes/s) and matmul throughput (FLOP/s).

    Returns:
        The fields of ``blockmgr.preemption.CostModel``: bytes_per_block, copy_bandwidth,
        flops_per_token (2 x parameters, Kaplan et al. 2020), flops_per_s.
    """
    nbytes = 16 * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=device.type == "cuda")
    copy_s = _timed(lambda: dst.copy_(src))
    hidden = model.config.hidden_size
    a = torch.randn(256, hidden, device=device)
    b = torch.randn(hidden, 4 * hidden, device=device)
    mm_s = _timed(lambda: a @ b)
    params = sum(p.numel() for p in model.parameters())
    return {
        "bytes_per_block": int(bytes_per_block),
        "copy_bandwidth": nbytes / copy_s,
        "flops_per_token": 2.0 * params,
        "flops_per_s": 2.0 * 256 * hidden * 4 * hidden / mm_s,
    }
