"""Wire protocol of the block-manager service: msgpack maps over a ZeroMQ ROUTER socket.

Every request is a map with an ``"op"`` key; every reply is ``{"ok": true, ...result}`` or
``{"ok": false, "error": message}``.

=============  ===================================================  ================================
op             request fields                                       reply fields
=============  ===================================================  ================================
``ping``       —                                                    —
``register``   executor_id, num_device_blocks, block_size,          resumed (bool), num_seqs
               num_cpu_blocks (optional, default 0)
``step``       executor_id, free: [seq_id], grow: [[seq_id, n]]     updates: {seq_id: [start, ids]},
                                                                    denied: {seq_id: reason}
``stats``      —                                                    executors: {id: per-tier counts}
``sequence``   executor_id, seq_id                                  sequence: block table details
=============  ===================================================  ================================
"""

from __future__ import annotations

from typing import Any

import msgpack

OPS = ("ping", "register", "step", "stats", "sequence")


class ProtocolError(Exception):
    """A message that does not follow this protocol."""


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(frame: bytes) -> dict[str, Any]:
    """Decode one frame into a map.

    Raises:
        ProtocolError: not msgpack, or not a map.
    """
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"expected a map, got {type(message).__name__}")
    return message


def ok(**result: Any) -> dict[str, Any]:
    return {"ok": True, **result}


def error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}
