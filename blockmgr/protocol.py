"""Wire protocol of the block-manager service: msgpack maps over a ZeroMQ ROUTER socket.

Every request is a map with an ``"op"`` key; every reply is ``{"ok": true, ...result}`` or
``{"ok": false, "error": message}``, with ``"code"`` added where a client must act on the kind of
refusal: ``"stale_incarnation"`` (a newer process of this executor id registered: stop) and
``"unknown_executor"`` (not registered: register again).

- ``ping`` -> ``{}``
- ``register``: executor_id, num_device_blocks, block_size, num_cpu_blocks (default 0), cost
  (optional map: bytes_per_block, copy_bandwidth, flops_per_token, flops_per_s), incarnation
  (optional: an id unique to the executor process) -> resumed, num_seqs, dropped_seqs
  (see :meth:`blockmgr.manager.BlockManager.register`)
- ``step``: executor_id, step_id, incarnation (optional), and the lists (each optional)
  ``fork [[parent, child]]``, ``free [seq]``, ``grow [[seq, num_tokens, [new token ids]]]``,
  ``swap_in [seq]``, ``admit [[seq, [prompt ids], num_new_tokens, cache_salt|nil, priority]]``
  -> ``updates {seq: [start, [block ids]]}``, ``denied {seq: reason}``, ``admitted {seq:
  num_cached_tokens}``, ``preempted {seq: "swap"|"recompute"}``, ``swapped_in [seq]``,
  ``swap_out [[device, cpu]]``, ``swap_in [[cpu, device]]``, ``copies [[src, dst]]``
  (see :meth:`blockmgr.manager.BlockManager.step`)
- with ``--redis-url``, the replies of ``register``, ``step`` and ``reset_prefix_cache`` carry
  ``durable``: true once the change is in Redis, false while Redis is down (the block manager
  serves from memory; see :mod:`blockmgr.persistence`)
- ``stats`` -> ``executors {id: counters}`` (with ``persistence {ok, error, ...}`` under Redis)
- ``sequence``: executor_id, seq_id -> ``sequence`` (block table with refcounts, tiers, hashes)
- ``match_prefix``: token_ids, cache_salt -> ``matches {executor_id: num_cached_tokens}``
- ``reset_prefix_cache``: executor_id (optional) -> reset, dropped_blocks, blocks_in_use, message

KV events (``--kv-events-bind``, a PUB socket): each message is one msgpack array
``[timestamp_seconds, [event, ...]]`` with events ``["BlockStored", executor_id, [hashes],
parent_hash, [token ids], block_size]``, ``["BlockRemoved", executor_id, [hashes]]`` and
``["AllBlocksCleared", executor_id]``. A subscriber that applies them in order mirrors every
executor's prefix cache (hash -> present).
"""

from __future__ import annotations

from typing import Any

import msgpack

OPS = ("ping", "register", "step", "stats", "sequence", "match_prefix", "reset_prefix_cache")


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


def error(message: str, code: str | None = None) -> dict[str, Any]:
    return {"ok": False, "error": message, **({"code": code} if code else {})}
