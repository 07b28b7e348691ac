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
  ``fork [[parent, child]]``, ``free [seq]``, ``grow [[seq, num_tokens, [token ids from the first
  one it lacks, -1 where not sampled yet]]]``,
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
- ``cache_lookup``: token_ids, cache_salt -> ``executors {id: {cached_tokens, device_tokens,
  cpu_tokens, pinned_tokens, num_tokens, block_size, prefix_id}}`` (:func:`blockmgr.cache_index.lookup`)
- ``cache_prefixes``: executor_id, offset, limit, max_tokens (all optional) -> total, prefixes
  (:func:`blockmgr.cache_index.list_prefixes`)
- ``pin``: token_ids + cache_salt, or prefix_id; executor_id, ttl_s (optional) -> pins
  (:func:`blockmgr.pins.pin`); ``unpin``: pin_id -> pin_id, executor_id, num_blocks;
  ``pins`` -> pins (every pin)
- ``block_map`` -> ``executors {id: {device, cpu}}``: one character per block
  (:func:`blockmgr.cache_index.block_map`)

A refusal may carry ``"code"``: ``not_cached``, ``unknown_pin``, ``pin_does_not_fit``, ``invalid``.

Every request is checked against the models below (types, ranges, sizes) before it touches any
state; :func:`parse_request` turns a violation into a :class:`ProtocolError` naming the field.

KV events (``--kv-events-bind``, a PUB socket): each message is one msgpack array
``[timestamp_seconds, [event, ...]]`` with events ``["BlockStored", executor_id, [hashes],
parent_hash, [token ids], block_size]``, ``["BlockRemoved", executor_id, [hashes]]`` and
``["AllBlocksCleared", executor_id]``; pins ``["BlockPinned", executor_id, [hashes], pin_id,
expires_at|nil]`` and ``["BlockUnpinned", executor_id, [hashes], pin_id, reason]`` (reason
``unpinned``, ``expired`` or ``executor_restarted``); and tier moves of the CPU tier
``["BlockMoved", executor_id, [hashes], from_tier, to_tier]`` (tiers ``device``, ``cpu``; a block
moved to ``cpu`` is still cached, so a router may count it as a slower hit). A subscriber that
applies them in order mirrors every executor's prefix cache (hash -> tier, pinned).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgpack
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError

OPS = ("ping", "register", "step", "stats", "sequence", "match_prefix", "reset_prefix_cache", "cache_lookup",
       "cache_prefixes", "pin", "unpin", "pins", "block_map")


class ProtocolError(Exception):
    """A message that does not follow this protocol."""


#: Bounds of one request's fields. Sizes past these are not a legitimate executor's.
MAX_ID_CHARS = 256
MAX_SALT_CHARS = 1024
MAX_TOKENS = 2**20  # tokens in one prompt / one grow entry
MAX_ENTRIES = 2**16  # entries in one list of a step
MAX_BLOCKS = 2**22  # blocks in one pool
MAX_BLOCK_SIZE = 4096  # tokens per block

Id = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)]
TokenId = Annotated[StrictInt, Field(ge=0, lt=2**31)]
Tokens = Annotated[list[TokenId], Field(max_length=MAX_TOKENS)]
#: A grow entry's id for a token not sampled when the entry was sent (pipelined scheduling); the
#: sequence's next grow gives the id.
PENDING = -1
GrowTokens = Annotated[list[Annotated[StrictInt, Field(ge=PENDING, lt=2**31)]], Field(max_length=MAX_TOKENS)]
Count = Annotated[StrictInt, Field(ge=0, le=2**40)]
Salt = Union[Annotated[StrictStr, Field(max_length=MAX_SALT_CHARS)], None]
Int64 = Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]
Rate = Annotated[float, Field(ge=0)]


def _entries(item):
    return Annotated[list[item], Field(max_length=MAX_ENTRIES)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class Ping(_Message):
    op: Literal["ping"]


class Cost(_Message):
    """:class:`blockmgr.preemption.CostModel` fields, finite and >= 0."""

    bytes_per_block: Annotated[StrictInt, Field(ge=0, le=2**40)] = 0
    copy_bandwidth: Rate = 0.0
    flops_per_token: Rate = 0.0
    flops_per_s: Rate = 0.0


class Register(_Message):
    op: Literal["register"]
    executor_id: Id
    num_device_blocks: Annotated[StrictInt, Field(ge=0, le=MAX_BLOCKS)]
    block_size: Annotated[StrictInt, Field(ge=1, le=MAX_BLOCK_SIZE)]
    num_cpu_blocks: Annotated[StrictInt, Field(ge=0, le=MAX_BLOCKS)] = 0
    cost: Cost = Cost()
    incarnation: Union[Id, None] = None


class Step(_Message):
    op: Literal["step"]
    executor_id: Id
    step_id: Union[Int64, None] = None
    fork: _entries(tuple[Id, Id]) = []
    free: _entries(Id) = []
    grow: _entries(tuple[Id, Count, GrowTokens]) = []
    swap_in: _entries(Id) = []
    admit: _entries(tuple[Id, Tokens, Count, Salt, Int64]) = []
    incarnation: Union[Id, None] = None


class Stats(_Message):
    op: Literal["stats"]
    summary: StrictBool = False


class SequenceQuery(_Message):
    op: Literal["sequence"]
    executor_id: Id
    seq_id: Id


class MatchPrefix(_Message):
    op: Literal["match_prefix"]
    token_ids: Tokens
    cache_salt: Salt = None


class ResetPrefixCache(_Message):
    op: Literal["reset_prefix_cache"]
    executor_id: Union[Id, None] = None


class CacheLookup(_Message):
    op: Literal["cache_lookup"]
    token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKENS)]
    cache_salt: Salt = None


class CachePrefixes(_Message):
    op: Literal["cache_prefixes"]
    executor_id: Union[Id, None] = None
    offset: Annotated[StrictInt, Field(ge=0, le=MAX_BLOCKS)] = 0
    limit: Annotated[StrictInt, Field(ge=1, le=1000)] = 50
    max_tokens: Annotated[StrictInt, Field(ge=0, le=1024)] = 32


class Pin(_Message):
    op: Literal["pin"]
    token_ids: Union[Tokens, None] = None
    cache_salt: Salt = None
    prefix_id: Union[Id, None] = None
    executor_id: Union[Id, None] = None
    ttl_s: Union[Annotated[float, Field(gt=0, le=10 * 365 * 86400)], None] = None


class Unpin(_Message):
    op: Literal["unpin"]
    pin_id: Id


class Pins(_Message):
    op: Literal["pins"]


class BlockMap(_Message):
    op: Literal["block_map"]


Request = Annotated[Union[Ping, Register, Step, Stats, SequenceQuery, MatchPrefix, ResetPrefixCache, CacheLookup,
                          CachePrefixes, Pin, Unpin, Pins, BlockMap],
                    Field(discriminator="op")]
_REQUEST = TypeAdapter(Request)


def parse_request(message: dict[str, Any]) -> BaseModel:
    """Validate a decoded request against its op's model.

    Raises:
        ProtocolError: unknown op, or a field of the wrong type, out of range, too long, or unknown.
    """
    return validate(_REQUEST, OPS, message)


def validate(adapter: TypeAdapter, ops: tuple[str, ...], message: dict[str, Any],
             error: type[Exception] = ProtocolError) -> BaseModel:
    """Validate ``message`` with ``adapter`` (a discriminated union of the models of ``ops``).

    Raises:
        error: unknown op, or a field that violates its model, named with its path.
    """
    op = message.get("op")
    if op not in ops:
        raise error(f"unknown op {op!r}; expected one of {', '.join(ops)}")
    try:
        return adapter.validate_python(message)
    except ValidationError as exc:
        raise error(f"op {op!r} has a malformed field: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    """The first few errors as ``field.path: message`` (without the offending input, which may be huge)."""
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or '(message)'}: {e['msg']}" for e in errors[:3]]
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    return "; ".join(parts)


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
