"""The gateway's configuration (set from ``pagedserve gateway`` / ``pagedserve serve`` flags)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from gateway.limits import DEFAULT_LIMITS, LIMIT_HELP


@dataclass
class GatewaySettings:
    """Where the gateway finds its model files and the other processes, and its limits.

    Attributes:
        model_dir: HF-layout directory with the tokenizer files and config.json.
        served_model_name: the name clients pass as ``model``.
        executors: ZeroMQ addresses of the executors.
        blockmgr: ZeroMQ address of the block manager.
        max_model_len: longest prompt + output accepted (the executors' own limit also applies).
        api_key: when set, ``/v1/*``, ``/tokenize`` and ``/detokenize`` need
            ``Authorization: Bearer <api_key>`` (401 otherwise).
        api_keys: more accepted keys, besides ``api_key``. Each key is a tenant (see
            :mod:`gateway.tenants`).
        admin_key: when set, ``/admin/*`` needs it as a bearer token; when not set, ``/admin/*``
            answers loopback clients only (403 otherwise).
        metrics_need_admin: ``/metrics`` is guarded like ``/admin/*`` (default: open, for
            Prometheus).
        isolate_tenants: with API keys, each key's prefix-cache entries are salted with its
            tenant, so no tenant can see (through ``cached_tokens`` or timing) what another sent.
        max_body_bytes: request bodies above this size are refused with 413.
        max_waiting_sequences: sequences (prompts x n, or beams) accepted but not yet producing
            tokens, across executors, beyond which a request gets 429 with ``Retry-After``
            (0: no limit). A batch request counts as a whole.
        The per-request limits (``max_sequences_per_request``, ``max_stop_strings``,
        ``max_stop_string_chars``, ``max_abs_priority``, ``min_temperature``,
        ``max_logit_bias_entries``) are described in :mod:`gateway.limits`.
        health_interval_s: how often the gateway polls each executor's ``info``.
        executor_timeout_s: an executor connected but reporting no progress (no output, no probe
            reply) this long while it has requests in flight (a hung step loop) is declared dead,
            and those requests resume elsewhere like those of a dead one; stretched to twice the
            executor's longest step (:class:`gateway.executors.ExecutorPool`). A process that dies
            is noticed within about 1.5 s (its connection drops).
        request_timeout_s: the deadline of every request, from its arrival: past it the request
            ends with a ``deadline_exceeded`` error (504, or an error event mid-stream) and its
            blocks are freed. It also bounds how long a request waits for an executor to
            resume on after its own died.
        version: reported by ``/version``.
        keys: the gateway's CURVE keys (``blockmgr.security.Keys``) for its ZeroMQ connections;
            None talks plain ZeroMQ to an ``--insecure-local`` stack.
    """

    model_dir: str
    served_model_name: str
    executors: list[str]
    blockmgr: str
    max_model_len: int
    api_key: str | None = None
    api_keys: list[str] = field(default_factory=list)
    admin_key: str | None = None
    metrics_need_admin: bool = False
    isolate_tenants: bool = True
    max_body_bytes: int = 8 * 2**20
    max_waiting_sequences: int = DEFAULT_LIMITS["max_waiting_sequences"]
    max_sequences_per_request: int = DEFAULT_LIMITS["max_sequences_per_request"]
    max_stop_strings: int = DEFAULT_LIMITS["max_stop_strings"]
    max_stop_string_chars: int = DEFAULT_LIMITS["max_stop_string_chars"]
    max_abs_priority: int = DEFAULT_LIMITS["max_abs_priority"]
    min_temperature: float = DEFAULT_LIMITS["min_temperature"]
    max_logit_bias_entries: int = DEFAULT_LIMITS["max_logit_bias_entries"]
    health_interval_s: float = 1.0
    executor_timeout_s: float = 10.0
    request_timeout_s: float = 600.0
    version: str = "0.1.0"
    keys: Any = None


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``pagedserve gateway`` and ``pagedserve serve``."""
    parser.add_argument("--api-key", action="append", default=None,
                        help="require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize; repeat for "
                             "several tenants (default: $PAGEDSERVE_API_KEY, comma-separated; unset: open)")
    parser.add_argument("--admin-key", default=os.environ.get("PAGEDSERVE_ADMIN_KEY"),
                        help="bearer token for /admin/* (default: $PAGEDSERVE_ADMIN_KEY; unset: loopback clients only)")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                        help="refuse request bodies over this size with 413 (default 8 MiB)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="deadline of each request in seconds from its arrival, after which it ends with an "
                             "error and frees its blocks (default %(default)s)")
    parser.add_argument("--metrics-need-admin", action="store_true",
                        help="guard /metrics like /admin/* (admin key, or loopback without one)")
    parser.add_argument("--shared-prefix-cache", action="store_true",
                        help="with API keys: let tenants share prefix-cache entries (default: each key's are salted)")
    for name, default in DEFAULT_LIMITS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(default), default=default, help=f"{LIMIT_HELP[name]} (default {default})")
    # The old name of --max-waiting-sequences (it counted requests).
    parser.add_argument("--max-waiting-requests", type=int, dest="max_waiting_sequences", help=argparse.SUPPRESS)


def api_keys_from(args: argparse.Namespace) -> list[str]:
    """The keys of ``--api-key`` (repeated), else of ``$PAGEDSERVE_API_KEY`` (comma-separated)."""
    keys = args.api_key if args.api_key else (os.environ.get("PAGEDSERVE_API_KEY") or "").split(",")
    return [k.strip() for k in keys if k and k.strip()]


def limits_from(args: argparse.Namespace) -> dict:
    """The request-limit settings from parsed flags; raises ValueError for a negative one."""
    out = {name: getattr(args, name) for name in DEFAULT_LIMITS}
    bad = [name for name, value in out.items() if value < 0]
    if bad:
        raise ValueError(f"--{bad[0].replace('_', '-')} must be >= 0")
    return out
