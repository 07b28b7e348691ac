"""Baseline: Hugging Face transformers ``generate`` with static batches.

The same requests, in the same order, are cut into batches of ``batch_size``. Each batch is
left-padded to its longest prompt and generates ``max(output_len)`` tokens for every member
(``min_new_tokens = max_new_tokens``, the static-batching counterpart of ``ignore_eos``), so a
batch lasts as long as its longest request. Throughput counts only the tokens each request asked
for (``sum(output_len)``), the same count as for our engine. Greedy decoding, the same weights
(the converted model directory) and dtype as ours, the same torch thread count.

``static_kv_utilization`` is what a contiguous per-batch KV cache would hold: at decode step
``t`` of a batch with prompts padded to ``P``, ``B * (P + t)`` slots are allocated and
``sum over unfinished requests of (p_i + t)`` hold live tokens (finished requests and padding
hold none); averaged over steps. The PagedAttention paper (Kwon et al., SOSP 2023, Fig. 2)
reports 20.4%-38.2% effective KV memory for such systems.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.serving.workloads import Workload


def load_hf(model_dir, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a Hugging Face directory, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model, tok


def static_kv_utilization(prompt_lens: list[int], output_lens: list[int]) -> tuple[float, int]:
    """(mean utilization over decode steps, number of steps) of one static batch (see module doc)."""
    p = np.asarray(prompt_lens)
    o = np.asarray(output_lens)
    steps = int(o.max())
    t = np.arange(1, steps + 1)[:, None]
    live = ((p[None, :] + t) * (t <= o[None, :])).sum(axis=1)
    allocated = len(p) * (p.max() + t[:, 0])
    return float((live / allocated).mean()), steps


def _pad_id(tok, model) -> int:
    for cand in (tok.pad_token_id, getattr(model.generation_config, "pad_token_id", None), tok.eos_token_id, 0):
        if isinstance(cand, int):
            return cand
    return 0


def run_hf(model, tok, workload: Workload, batch_size: int, *, progress: bool = True) -> dict:
    """Run ``workload`` in static batches of ``batch_size``; figures as in :func:`benchmarks.serving.offline.run`."""
    from transformers import GenerationConfig

    for r in workload.requests:
        if r.n != 1 or r.beam_width:
            raise ValueError("the HF baseline runs n=1 workloads without beam search only")
    pad = _pad_id(tok, model)
    reqs = workload.requests
    e2e: list[float] = []
    utils, util_steps = [], []
    produced = 0
    t0 = time.perf_counter()
    bar = tqdm(total=sum(r.output_len for r in reqs), desc=f"hf bs={batch_size}", unit="tok",
               disable=not progress, leave=False)
    for start in range(0, len(reqs), batch_size):
        batch = reqs[start : start + batch_size]
        plen = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), plen), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), plen), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r.prompt_token_ids)
            ids[i, plen - n :] = torch.tensor(r.prompt_token_ids)
            mask[i, plen - n :] = 1
        new = max(r.output_len for r in batch)
        cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1,
                               pad_token_id=pad, eos_token_id=tok.eos_token_id)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        assert out.shape[1] == plen + new, out.shape
        now = time.perf_counter() - t0
        e2e.extend([now] * len(batch))
        useful = sum(r.output_len for r in batch)
        produced += useful
        bar.update(useful)
        u, steps = static_kv_utilization([len(r.prompt_token_ids) for r in batch], [r.output_len for r in batch])
        utils.append(u)
        util_steps.append(steps)
    bar.close()
    elapsed = time.perf_counter() - t0
    prompt_tokens = sum(len(r.prompt_token_ids) for r in reqs)
    return {
        "system": "hf-static",
        "workload": workload.name,
        "batch_size": batch_size,
        "elapsed_s": elapsed,
        "num_requests": len(reqs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": produced,
        "requests_per_s": len(reqs) / elapsed,
        "output_tokens_per_s": produced / elapsed,
        "total_tokens_per_s": (produced + prompt_tokens) / elapsed,
        "static_kv_utilization": float(np.average(utils, weights=util_steps)),
        "e2e_s": e2e,
    }


def warm_up(model, tok) -> None:
    """One short generate, so one-time set-up costs fall outside the measured runs."""
    from transformers import GenerationConfig

    ids = torch.tensor([tok.encode("Hello, world. This is a warm-up.")])
    cfg = GenerationConfig(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=_pad_id(tok, model))
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
