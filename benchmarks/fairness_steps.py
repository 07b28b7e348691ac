#!/usr/bin/env python3
"""TTFT and preemptions per request, counted in engine steps, under a closed-loop load.

Drives the real :class:`executor.engine.Engine` with an in-process block manager on a tiny
random-weight Llama (the scheduler and the block manager's decisions do not depend on the
weights), so the numbers carry no wall-clock noise: a request's TTFT is the number of engine
steps from the step it was added before to the step that produced its first token.

The load is a closed loop like ``vllm bench serve --max-concurrency C`` with random prompts:
``concurrency`` requests start at once, and each one that finishes is replaced by the next,
until ``num_requests`` have been sent. Prompts are random token ids (no prefix-cache hits);
every request generates exactly ``output_len`` tokens (``ignore_eos``).

Run it (prints the TTFT distribution in steps and the preemption counts)::

    python benchmarks/fairness_steps.py                      # issue 14's c=64, 64 x 161 in / 200 out
    python benchmarks/fairness_steps.py --num-requests 256 --num-blocks 1000   # KV oversubscribed

Not a timing benchmark; tests/executor/test_fairness.py runs a scaled-down load through
:func:`run_closed_loop`.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import torch

# Our model module first: it imports this project's `kernels` package before transformers does.
from executor.model import LlamaForCausalLM
from transformers import LlamaConfig

from benchmarks.settings import BenchmarkSettings
from blockmgr.client import InProcessBlockManager
from blockmgr.manager import BlockManager
from blockmgr.settings import load, reuse, setting
from executor.config import ExecutorSettings
from executor.engine import Engine, EngineConfig
from executor.request import SamplingParams

VOCAB = 64


@dataclass
class RequestSteps:
    """One request's life in engine steps (``added``: steps run before it was added)."""

    request_id: str
    added: int
    first_token: int | None = None
    finished: int | None = None
    num_preemptions: int = 0
    ttft_tokens: int = 0  # tokens every request computed in the steps it waited for its first token

    @property
    def ttft_steps(self) -> int:
        return self.first_token - self.added


def tiny_engine(*, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                max_model_len: int = 1024) -> Engine:
    """An fp32 CPU engine on a 1-layer random Llama (hidden 32, vocab 64) over a fresh block manager."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=max_model_len)
    model = LlamaForCausalLM(cfg).eval()
    bm = InProcessBlockManager(BlockManager(enable_prefix_caching=True))
    config = EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens)
    return Engine(model, bm, config, eos_token_ids={0})


def run_closed_loop(engine: Engine, *, num_requests: int, concurrency: int, prompt_len: int, output_len: int,
                    seed: int = 0, max_steps: int = 1_000_000) -> list[RequestSteps]:
    """Run the closed-loop load to the end; returns each request's steps, in arrival order.

    Raises:
        RuntimeError: a request failed, or the load did not finish within ``max_steps`` steps.
    """
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0)
    stats: dict[str, RequestSteps] = {}
    requests = {}
    step = 0

    def add() -> None:
        rid = f"r{len(stats)}"
        engine.add_request(rid, [rng.randrange(1, VOCAB) for _ in range(prompt_len)], params)
        stats[rid] = RequestSteps(rid, step)
        requests[rid] = engine.requests[rid]

    for _ in range(min(concurrency, num_requests)):
        add()
    step_tokens: list[int] = []  # tokens computed in each step: a wall-clock proxy (prefill dominates)
    engine.record_steps = True
    while engine.has_work():
        if step >= max_steps:
            raise RuntimeError(f"the load did not finish within {max_steps} steps")
        num_records = len(engine.step_records)
        outputs = engine.step()
        step += 1
        ran = len(engine.step_records) > num_records
        step_tokens.append(sum(engine.step_records[-1].scheduled.values()) if ran else 0)
        for out in outputs:
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            s = stats[out.request_id]
            if out.new_token_ids and s.first_token is None:
                s.first_token = step
            if out.finished:
                s.finished = step
                if len(stats) < num_requests:
                    add()
    for rid, s in stats.items():
        s.num_preemptions = requests[rid].num_preemptions
        s.ttft_tokens = sum(step_tokens[s.added : s.first_token])
    return list(stats.values())


def summary(stats: list[RequestSteps]) -> dict:
    """TTFT percentiles (nearest rank) in steps and in tokens computed meanwhile, preemptions, steps."""

    def pct(values: list[int], q: float) -> int:
        return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]

    ttft = sorted(s.ttft_steps for s in stats)
    tokens = sorted(s.ttft_tokens for s in stats)
    return {
        "requests": len(stats),
        "steps": max(s.finished for s in stats),
        "ttft_p50": statistics.median(ttft),
        "ttft_p90": pct(ttft, 0.90),
        "ttft_p99": pct(ttft, 0.99),
        "ttft_max": ttft[-1],
        "ttft_tokens_p50": statistics.median(tokens),
        "ttft_tokens_p99": pct(tokens, 0.99),
        "ttft_tokens_max": tokens[-1],
        "preemptions": sum(s.num_preemptions for s in stats),
        "max_preemptions": max(s.num_preemptions for s in stats),
    }


class FairnessBenchSettings(BenchmarkSettings):
    num_requests: int = setting(64, "requests sent in all", ge=1)
    concurrency: int = setting(64, "requests in flight (closed loop)", ge=1)
    prompt_len: int = setting(161, "prompt tokens of each request", ge=1)
    output_len: int = setting(200, "tokens each request generates", ge=1)
    num_blocks: int = setting(1456, "device KV blocks (1456: what 1 GiB holds for SmolLM2-135M in fp32)", ge=1)
    block_size: int = reuse(ExecutorSettings, "block_size")
    max_num_seqs: int = reuse(ExecutorSettings, "max_num_seqs")
    max_num_batched_tokens: int | None = reuse(ExecutorSettings, "max_num_batched_tokens")


def main(argv: list[str] | None = None) -> None:
    args, _ = load(FairnessBenchSettings, argv, "fairness_steps.py", __doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    engine = tiny_engine(num_blocks=args.num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens)
    stats = run_closed_loop(engine, num_requests=args.num_requests, concurrency=args.concurrency,
                            prompt_len=args.prompt_len, output_len=args.output_len)
    s = summary(stats)
    print(f"{s['requests']} requests, c={args.concurrency}, {args.prompt_len} in / {args.output_len} out, "
          f"{args.num_blocks} blocks x {args.block_size}: {s['steps']} steps")
    print(f"TTFT in steps: p50 {s['ttft_p50']}  p90 {s['ttft_p90']}  p99 {s['ttft_p99']}  max {s['ttft_max']}")
    print(f"TTFT in tokens computed meanwhile: p50 {s['ttft_tokens_p50']}  p99 {s['ttft_tokens_p99']}  "
          f"max {s['ttft_tokens_max']}")
    print(f"preemptions: {s['preemptions']} in all, at most {s['max_preemptions']} for one request")


if __name__ == "__main__":
    main()
