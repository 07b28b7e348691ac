"""The gateway's configuration (set from ``pagedserve gateway`` / ``pagedserve serve`` flags)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any


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
        admin_key: when set, ``/admin/*`` needs it as a bearer token; when not set, ``/admin/*``
            answers loopback clients only (403 otherwise).
        max_body_bytes: request bodies above this size are refused with 413.
        max_waiting_requests: requests accepted but not yet producing tokens, across executors,
            beyond which new requests get 503 with ``Retry-After`` (0: no limit).
        health_interval_s: how often the gateway polls each executor's ``info``.
        executor_timeout_s: an executor silent this long while it has requests in flight is
            declared dead and those requests fail with 503 / an error event.
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
    admin_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    max_waiting_requests: int = 0
    health_interval_s: float = 1.0
    executor_timeout_s: float = 60.0
    version: str = "0.1.0"
    keys: Any = None


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``pagedserve gateway`` and ``pagedserve serve``."""
    parser.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize "
                             "(default: $PAGEDSERVE_API_KEY; unset: open)")
    parser.add_argument("--admin-key", default=os.environ.get("PAGEDSERVE_ADMIN_KEY"),
                        help="bearer token for /admin/* (default: $PAGEDSERVE_ADMIN_KEY; unset: loopback clients only)")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                        help="refuse request bodies over this size with 413 (default 8 MiB)")
    parser.add_argument("--max-waiting-requests", type=int, default=0,
                        help="answer 503 + Retry-After when this many requests wait for their first token (0: no limit)")
