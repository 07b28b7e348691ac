"""Online benchmark: requests to a running gateway with Poisson arrivals.

Requests go to ``POST /v1/completions`` with ``stream: true``, the workload's prompt text,
``max_tokens`` = its output length, ``ignore_eos: true`` and ``stream_options.include_usage``.
Inter-arrival gaps are exponential with mean ``1 / request_rate`` seconds (a Poisson process),
drawn from the seed; ``inf`` sends everything at once.

Per request:

- TTFT: from sending the request to the first streamed chunk carrying text;
- ITL (inter-token latency): the gaps between later text chunks, each divided by the number of
  tokens the chunk carries when that is known (the gateway may hold back text that could still
  become a stop string or half a UTF-8 character, so a chunk can carry several tokens);
- end-to-end latency: from sending to the end of the stream.

Throughput is completion tokens (the ``usage`` the gateway reports) over the wall time from the
first request sent to the last stream closed. Beam requests are sent without streaming
(``use_beam_search`` with ``best_of``): only their end-to-end latency is measured.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
from tqdm.auto import tqdm

from benchmarks.serving.workloads import BenchRequest, Workload


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {f"p{p}": None for p in ps} | {"mean": None}
    return {f"p{p}": float(np.percentile(vals, p)) for p in ps} | {"mean": float(np.mean(vals))}


def arrival_times(num: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of ``num`` requests at ``rate`` per second (Poisson; inf: all at 0)."""
    if rate == float("inf") or rate <= 0:
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, num)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def request_body(req: BenchRequest, model: str) -> dict:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": req.temperature,
            "ignore_eos": True, "n": req.n}
    if req.seed is not None:
        body["seed"] = req.seed
    if req.beam_width:
        body.update(use_beam_search=True, best_of=req.beam_width, temperature=0.0, n=1)
    else:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def _one(client: httpx.AsyncClient, url: str, req: BenchRequest, model: str, delay: float, t0: float,
               bar) -> dict:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    sent = time.perf_counter()
    rec = {"sent_s": sent - t0, "ttft_s": None, "itl_s": [], "e2e_s": None, "completion_tokens": 0,
           "prompt_tokens": None, "cached_tokens": None, "error": None}
    body = request_body(req, model)
    try:
        if not body.get("stream"):
            r = await client.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {r.text[:300]}"
            else:
                usage = r.json().get("usage") or {}
                rec["completion_tokens"] = usage.get("completion_tokens", 0)
                rec["prompt_tokens"] = usage.get("prompt_tokens")
            rec["e2e_s"] = time.perf_counter() - sent
            return rec
        last = None
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec["error"] = str(chunk["error"])[:300]
                    continue
                now = time.perf_counter()
                if any(c.get("text") for c in chunk.get("choices") or []):
                    if rec["ttft_s"] is None:
                        rec["ttft_s"] = now - sent
                    else:
                        rec["itl_s"].append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage:
                    rec["completion_tokens"] = usage.get("completion_tokens", 0)
                    rec["prompt_tokens"] = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    rec["cached_tokens"] = details.get("cached_tokens")
        rec["e2e_s"] = time.perf_counter() - sent
        # A chunk can carry several tokens: spread each gap over them when the count is known.
        chunks = len(rec["itl_s"]) + 1
        per_chunk = rec["completion_tokens"] / max(1, req.n) / chunks if rec["completion_tokens"] else 1
        if per_chunk > 1:
            rec["itl_s"] = [g / per_chunk for g in rec["itl_s"]]
    except httpx.HTTPError as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        bar.update(1)
    return rec


async def _run(url: str, workload: Workload, rate: float, seed: int, model: str | None, timeout_s: float,
               progress: bool, max_connections: int) -> dict:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        if model is None:
            r = await client.get(url + "/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        times = arrival_times(len(workload.requests), rate, seed)
        t0 = time.perf_counter()
        with tqdm(total=len(times), desc=f"{workload.name} @ {rate}/s", unit="req", disable=not progress,
                  leave=False) as bar:
            recs = await asyncio.gather(*[_one(client, url, req, model, d, t0, bar)
                                          for req, d in zip(workload.requests, times)])
        elapsed = time.perf_counter() - t0
    return summarize(workload, rate, recs, elapsed)


def summarize(workload: Workload, rate: float, recs: list[dict], elapsed: float) -> dict:
    ok = [r for r in recs if r["error"] is None]
    out_tokens = sum(r["completion_tokens"] or 0 for r in ok)
    prompt_tokens = sum(r["prompt_tokens"] or 0 for r in ok)
    itl = [g for r in ok for g in r["itl_s"]]
    res = {
        "system": "pagedserve-http",
        "workload": workload.name,
        "request_rate": rate,
        "elapsed_s": elapsed,
        "num_requests": len(recs),
        "num_errors": len(recs) - len(ok),
        "errors": sorted({r["error"] for r in recs if r["error"]})[:5],
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "requests_per_s": len(ok) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + prompt_tokens) / elapsed,
        "ttft": percentiles([r["ttft_s"] for r in ok]),
        "itl": percentiles(itl),
        "e2e": percentiles([r["e2e_s"] for r in ok]),
        "requests": recs,
    }
    if workload.name == "shared-prefix" and ok:
        cold = [r["ttft_s"] for r in ok[:1]]
        warm = [r["ttft_s"] for r in ok[1:] if r["ttft_s"] is not None]
        if cold[0] and warm:
            res["cold_ttft_s"] = cold[0]
            res["warm_ttft_median_s"] = float(np.median(warm))
            res["warm_over_cold"] = res["warm_ttft_median_s"] / cold[0]
    return res


def run_serve(url: str, workload: Workload, rate: float, *, seed: int = 0, model: str | None = None,
              timeout_s: float = 3600.0, progress: bool = True, max_connections: int = 256) -> dict:
    """Send ``workload`` to the gateway at ``url`` at ``rate`` requests/s; returns the figures.

    For ``shared-prefix`` the first request is sent alone first (after ``POST /admin/cache/reset``,
    when the gateway allows it), so its TTFT is a cold one; the others then arrive at ``rate`` and
    find the system prompt cached (``warm_over_cold`` in the result).
    """
    url = url.rstrip("/")
    if workload.name == "shared-prefix" and len(workload.requests) > 1:
        try:
            httpx.post(url + "/admin/cache/reset", timeout=30)
        except httpx.HTTPError:
            pass
        first = Workload(workload.name, workload.requests[:1], workload.params)
        rest = Workload(workload.name, workload.requests[1:], workload.params)
        a = asyncio.run(_run(url, first, float("inf"), seed, model, timeout_s, False, max_connections))
        b = asyncio.run(_run(url, rest, rate, seed, model, timeout_s, progress, max_connections))
        recs = a["requests"] + b["requests"]
        return summarize(workload, rate, recs, b["elapsed_s"]) | {"cold_request_elapsed_s": a["elapsed_s"]}
    return asyncio.run(_run(url, workload, rate, seed, model, timeout_s, progress, max_connections))
