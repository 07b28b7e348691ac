"""Offline benchmark: our :class:`~executor.engine.Engine` in this process, no HTTP.

The engine talks to an in-process block manager (:class:`~blockmgr.client.InProcessBlockManager`,
the same state machine as the service, messages still round-tripped through msgpack). Every
request arrives at time 0 and the engine runs until all have finished. After each engine step the
benchmark samples the block manager's state:

- ``used_blocks``: device blocks with a reference count above zero;
- ``unshared_blocks``: the blocks the same sequences would hold without any sharing, i.e.
  ``sum(ceil(num_tokens / block_size))`` over the running sequences;
- ``token_utilization``: slots holding a token / slots in the allocated blocks, the block
  manager's own ``stats()`` figure (a block shared by several sequences counts once, with the
  fill of its fullest user).

KV utilization is the mean of ``token_utilization`` over steps with at least one block in use.
Sharing savings are ``1 - sum(used_blocks) / sum(unshared_blocks)`` over the steps, i.e. the
saved fraction of the time-integrated memory, the measure of the PagedAttention paper (Kwon et
al., SOSP 2023, §6.3: "the number of blocks we saved by sharing divided by the number of total
blocks without sharing").
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from blockmgr.client import InProcessBlockManager
from blockmgr.manager import BlockManager, blocks_for
from executor.config import token_budget
from executor.engine import Engine, EngineConfig
from executor.request import SamplingParams
from benchmarks.serving.workloads import BenchRequest, Workload

EXECUTOR_ID = "bench-0"


def beam_search_supported() -> bool:
    """True when the executor's SamplingParams has the beam-search fields."""
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    return {"use_beam_search", "beam_width"} <= names


class BeamSearchUnavailable(RuntimeError):
    pass


def sampling_params(req: BenchRequest) -> SamplingParams:
    """The executor's SamplingParams for one benchmark request (``ignore_eos``: exact lengths).

    Raises:
        BeamSearchUnavailable: a beam request while the executor has no beam search.
    """
    kw = dict(max_tokens=req.output_len, temperature=req.temperature, n=req.n, seed=req.seed, ignore_eos=True)
    if req.beam_width:
        if not beam_search_supported():
            raise BeamSearchUnavailable(
                "the beam workload needs beam search in the executor (SamplingParams.use_beam_search / "
                "beam_width in executor/request.py), which this version does not have"
            )
        kw.update(use_beam_search=True, beam_width=req.beam_width, temperature=0.0)
    return SamplingParams(**kw)


@dataclasses.dataclass
class OfflineConfig:
    """The offline benchmark's engine: its settings (pool sizes resolved), prefix caching, device, dtype."""

    engine: EngineConfig
    prefix_caching: bool = True
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def summary(self) -> dict:
        """What the results file records of it."""
        fields = ("block_size", "num_blocks", "max_num_seqs", "max_model_len")
        return {**{f: getattr(self.engine, f) for f in fields},
                "max_num_batched_tokens": token_budget(self.engine.max_num_batched_tokens, self.device, self.dtype),
                "prefix_caching": self.prefix_caching, "device": self.device, "dtype": str(self.dtype)}


def make_engine(model, eos_ids: set[int], cfg: OfflineConfig) -> tuple[Engine, InProcessBlockManager]:
    bm = InProcessBlockManager(BlockManager(enable_prefix_caching=cfg.prefix_caching))
    engine = Engine(model, bm, cfg.engine, eos_ids, executor_id=EXECUTOR_ID, device=cfg.device, dtype=cfg.dtype)
    engine.record_steps = True
    return engine, bm


def _memory_sample(bm: InProcessBlockManager) -> tuple[int, int, int, float]:
    """(used blocks, unshared blocks, live tokens, token utilization) of the bench executor now."""
    ex = bm.manager.executors[EXECUTOR_ID]
    running = [s for s in ex.seqs.values() if not s.swapped and s.block_table]
    unshared = sum(blocks_for(s.num_tokens, ex.block_size) for s in running)
    live = sum(s.num_tokens for s in running)
    util = bm.stats()[EXECUTOR_ID]["token_utilization"]
    return ex.device.num_used, unshared, live, util


def run(engine: Engine, bm: InProcessBlockManager, workload: Workload, *, desc: str | None = None,
        progress: bool = True) -> dict:
    """Submit every request of ``workload`` at once and step the engine until all are done.

    Returns:
        A dict of figures (times in seconds, rates per second) plus ``timeline`` (one entry per
        step) and per-request ``ttft_s`` / ``e2e_s`` lists; see the module docstring.
    """
    engine.step_records.clear()
    params = [sampling_params(r) for r in workload.requests]
    expected = sum(p.max_tokens * max(1, p.n) for p in params)
    pre = bm.stats()[EXECUTOR_ID]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    done_parts: dict[str, int] = {}
    produced = 0
    timeline = []
    decode_tokens, decode_time = 0, 0.0
    ids = [f"{workload.name}-{i}" for i in range(len(workload.requests))]
    t0 = time.perf_counter()
    for rid, req, p in zip(ids, workload.requests, params):
        engine.add_request(rid, list(req.prompt_token_ids), p)
    with tqdm(total=expected, desc=desc or workload.name, unit="tok", disable=not progress, leave=False) as bar:
        while engine.has_work():
            outs = engine.step()
            now = time.perf_counter() - t0
            step_tokens = 0
            for o in outs:
                if o.error:
                    raise RuntimeError(f"request {o.request_id} failed: {o.error}")
                if o.new_token_ids:
                    first.setdefault(o.request_id, now)
                    step_tokens += len(o.new_token_ids)
                if o.finished:
                    done_parts[o.request_id] = done_parts.get(o.request_id, 0) + 1
                    last[o.request_id] = now
            produced += step_tokens
            bar.update(step_tokens)
            rec = engine.step_records[-1] if engine.step_records else None
            if rec is not None and rec.scheduled and all(n == 1 for n in rec.scheduled.values()):
                decode_tokens += step_tokens
                decode_time += rec.duration_s
            used, unshared, live, util = _memory_sample(bm)
            timeline.append({"t": now, "used_blocks": used, "unshared_blocks": unshared, "live_tokens": live,
                             "token_utilization": util, "num_running": len(engine.scheduler.running),
                             "step_tokens": step_tokens})
    elapsed = time.perf_counter() - t0
    post = bm.stats()[EXECUTOR_ID]
    busy = [s for s in timeline if s["used_blocks"] > 0]
    used_sum = sum(s["used_blocks"] for s in busy)
    unshared_sum = sum(s["unshared_blocks"] for s in busy)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in workload.requests)
    hits = post["prefix_cache"]["hits_tokens"] - pre["prefix_cache"]["hits_tokens"]
    queries = post["prefix_cache"]["queries_tokens"] - pre["prefix_cache"]["queries_tokens"]
    return {
        "system": "pagedserve",
        "workload": workload.name,
        "elapsed_s": elapsed,
        "num_requests": len(workload.requests),
        "prompt_tokens": prompt_tokens,
        "output_tokens": produced,
        "expected_output_tokens": expected,
        "requests_per_s": len(workload.requests) / elapsed,
        "output_tokens_per_s": produced / elapsed,
        "total_tokens_per_s": (produced + prompt_tokens) / elapsed,
        "decode_tokens_per_s": decode_tokens / decode_time if decode_time else None,
        "num_steps": len(timeline),
        "kv_utilization": float(np.mean([s["token_utilization"] for s in busy])) if busy else None,
        "peak_used_blocks": max((s["used_blocks"] for s in timeline), default=0),
        "peak_unshared_blocks": max((s["unshared_blocks"] for s in timeline), default=0),
        "sharing_savings": 1 - used_sum / unshared_sum if unshared_sum else 0.0,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "copy_on_write": post["copy_on_write"] - pre["copy_on_write"],
        "preemptions": {k: post["preemptions"][k] - pre["preemptions"][k] for k in post["preemptions"]},
        "ttft_s": [first.get(i) for i in ids],
        "e2e_s": [last.get(i) for i in ids],
        "timeline": timeline,
    }


def prefix_ttft(engine: Engine, bm: InProcessBlockManager, workload: Workload, samples: int = 4) -> dict:
    """Time to first token of shared-prefix requests run one at a time, cold and warm.

    Cold: the prefix cache is emptied (``reset_prefix_cache``) before each of the first
    ``samples`` requests, so its whole prompt is prefilled. Warm: the next ``samples`` requests
    (other questions) run after those, with the shared system prompt in the cache. Each request
    generates one token; TTFT is from ``add_request`` to that token.

    Returns:
        ``cold_ttft_s`` and ``warm_ttft_s`` lists, their medians and ``warm_over_cold`` (ratio of medians).
    """
    reqs = workload.requests
    if len(reqs) < 2 * samples:
        samples = max(1, len(reqs) // 2)

    def one(rid: str, req: BenchRequest) -> float:
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        engine.add_request(rid, list(req.prompt_token_ids), params)
        ttft = None
        while engine.has_work():
            for o in engine.step():
                if o.new_token_ids and ttft is None:
                    ttft = time.perf_counter() - t
        return ttft

    cold, warm = [], []
    for i, req in enumerate(reqs[:samples]):
        bm.reset_prefix_cache(EXECUTOR_ID)
        cold.append(one(f"cold-{i}", req))
    hits_before = bm.stats()[EXECUTOR_ID]["prefix_cache"]["hits_tokens"]
    for i, req in enumerate(reqs[samples : 2 * samples]):
        warm.append(one(f"warm-{i}", req))
    hits = bm.stats()[EXECUTOR_ID]["prefix_cache"]["hits_tokens"] - hits_before
    c, w = float(np.median(cold)), float(np.median(warm))
    return {"cold_ttft_s": cold, "warm_ttft_s": warm, "cold_ttft_median_s": c, "warm_ttft_median_s": w,
            "warm_over_cold": w / c, "warm_cached_tokens_per_request": hits / len(warm)}
