"""Prometheus metrics (``GET /metrics``), through prometheus-client, on a registry per app.

Gateway-side (label ``model_name``):

- ``pagedserve:prompt_tokens_total``, ``pagedserve:generation_tokens_total`` (counters);
- ``pagedserve:time_to_first_token_seconds``, ``pagedserve:inter_token_latency_seconds``,
  ``pagedserve:e2e_request_latency_seconds`` (histograms).

Read at scrape time from the block manager's stats and the executors' ``info`` (label
``executor``):

- ``pagedserve:kv_cache_usage_perc``: used device blocks / total, a fraction in [0, 1] (as
  vLLM's ``gpu_cache_usage_perc``: 1 means 100 percent);
- ``pagedserve:prefix_cache_queries_total``, ``pagedserve:prefix_cache_hits_total``: prompt
  tokens looked up in / found in the prefix cache;
- ``pagedserve:num_preemptions_total{kind}``: ``kind`` is ``swap`` or ``recompute``;
- ``pagedserve:blockmgr_persistence_ok``: 1 while the block manager's Redis store takes every
  change, 0 while it serves from memory only (absent without ``--redis-url``);
- ``pagedserve:num_requests_running``, ``pagedserve:num_requests_waiting``,
  ``pagedserve:num_requests_swapped``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0)


def _num(d, *path, default=0.0) -> float:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    try:
        return float(d)
    except (TypeError, ValueError):
        return default


class _Snapshot:
    """Collector of the block manager's and the executors' numbers, as last fetched."""

    def __init__(self):
        self.bm_stats: dict = {}
        self.executor_infos: dict[str, dict] = {}

    def collect(self):
        usage = GaugeMetricFamily("pagedserve:kv_cache_usage_perc",
                                  "KV-cache usage of the device pool: used blocks / total (1 = 100%).",
                                  labels=["executor"])
        queries = CounterMetricFamily("pagedserve:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.", labels=["executor"])
        hits = CounterMetricFamily("pagedserve:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.", labels=["executor"])
        preempt = CounterMetricFamily("pagedserve:num_preemptions",
                                      "Preempted sequences, by kind (swap or recompute).",
                                      labels=["executor", "kind"])
        durable = GaugeMetricFamily("pagedserve:blockmgr_persistence_ok",
                                    "1 while the block manager's Redis store takes every change, 0 while it is down.",
                                    labels=["executor"])
        for ex_id, st in sorted(self.bm_stats.items()):
            if isinstance(st.get("persistence"), dict):
                durable.add_metric([ex_id], 1.0 if st["persistence"].get("ok") else 0.0)
            total = _num(st, "device", "total")
            usage.add_metric([ex_id], _num(st, "device", "used") / total if total else 0.0)
            queries.add_metric([ex_id], _num(st, "prefix_cache", "queries_tokens"))
            hits.add_metric([ex_id], _num(st, "prefix_cache", "hits_tokens"))
            kinds = st.get("preemptions") if isinstance(st.get("preemptions"), dict) else {}
            for kind in sorted(set(kinds) | {"swap", "recompute"}):
                preempt.add_metric([ex_id, kind], _num(kinds, kind))
        yield from (usage, queries, hits, preempt, durable)
        for name, key, doc in (("running", "num_running", "Requests running on the executor."),
                               ("waiting", "num_waiting", "Requests waiting in the executor's queue."),
                               ("swapped", "num_swapped", "Requests swapped out to CPU memory.")):
            g = GaugeMetricFamily(f"pagedserve:num_requests_{name}", doc, labels=["executor"])
            for ex_id, info in sorted(self.executor_infos.items()):
                g.add_metric([ex_id], _num(info, key))
            yield g


class GatewayMetrics:
    """The app's metrics; the routes record requests, ``render`` produces the exposition text."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.snapshot = _Snapshot()
        self.registry.register(self.snapshot)
        labels = ["model_name"]
        self.prompt_tokens = Counter("pagedserve:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("pagedserve:generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry).labels(model_name)
        self.ttft = Histogram("pagedserve:time_to_first_token_seconds", "Time to the first generated token.",
                              labels, buckets=_TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("pagedserve:inter_token_latency_seconds", "Time between two generated tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("pagedserve:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)

    def update(self, bm_stats: dict | None, executor_infos: dict[str, dict]) -> None:
        """New numbers for the next scrape; ``bm_stats`` None (block manager silent) keeps the last."""
        if bm_stats is not None:
            self.snapshot.bm_stats = bm_stats
        self.snapshot.executor_infos = executor_infos

    def render(self) -> bytes:
        return generate_latest(self.registry)
