"""Pins: cached prefixes kept out of eviction until unpinned or until their TTL runs out.

A pin holds one reference on each device block of a cached prefix, so the block never reaches the
free queue and no eviction policy can take it; unpinning (or expiry) drops those references, and a
block with no other user goes back to the free queue still cached. Pinned blocks of an executor
(counted once however many pins share them) are capped at ``pin_share`` of its device pool, so
pins can never starve admission; a pin that would cross the cap is refused whole.

Pins are plain maps in ``ExecutorState.pins`` (``pin_id -> {"pin_id", "hashes", "blocks",
"created_at", "expires_at"}``), so they are part of the block manager's snapshot and survive a
restart from Redis; the pool's refcounts in the same snapshot already include their references.
An executor that re-registers as a new incarnation loses its cache and with it its pins
(``BlockUnpinned`` events with reason ``executor_restarted``). TTLs are wall-clock (Unix seconds),
checked before every step and every pin operation.
"""

from __future__ import annotations

import itertools
import time
import uuid

from blockmgr.cache_index import cached_nodes, chain_to, match_tiers, parse_prefix_id


class PinError(Exception):
    """A pin request that cannot be honoured; ``code`` is ``not_cached``, ``unknown_pin``,
    ``pin_does_not_fit`` or ``invalid``."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def pinned_blocks(ex) -> set[int]:
    return {b for pin in ex.pins.values() for b in pin["blocks"]}


def pin_limit(ex, pin_share: float) -> int:
    """Most device blocks of ``ex`` that pins may hold at once."""
    return int(pin_share * ex.device.num_blocks)


def _device_prefix(manager, token_ids, cache_salt, prefix, executor_id) -> dict[str, list[tuple[int, int]]]:
    """Per executor, the ``(hash, device block)`` chain a pin request names (device part only)."""
    out = {}
    if prefix is not None:
        try:
            ex_id, leaf = parse_prefix_id(prefix)
        except ValueError as exc:
            raise PinError(str(exc), "invalid") from None
        ex = manager.executors.get(ex_id)
        chain = chain_to(cached_nodes(ex), leaf) if ex is not None else None
        if chain is None:
            raise PinError(f"prefix {prefix!r} is not cached", "not_cached")
        out[ex_id] = chain
    else:
        for ex_id, ex in manager.executors.items():
            if executor_id is None or ex_id == executor_id:
                out[ex_id] = [h for h, _, _ in match_tiers(ex, token_ids, cache_salt)]
    # Only the device part can be pinned; a chain's device blocks come first (see match_tiers).
    for ex_id, chain in list(out.items()):
        cache = manager.executors[ex_id].cache
        out[ex_id] = [(h, cache[h]) for h in itertools.takewhile(cache.__contains__, chain)]
        if not out[ex_id]:
            del out[ex_id]
    if not out:
        raise PinError("no full block of this prompt is cached on a device"
                       + (f" of executor {executor_id!r}" if executor_id else ""), "not_cached")
    return out


def pin(manager, token_ids: list[int] | None = None, cache_salt: str | None = None, prefix: str | None = None,
        executor_id: str | None = None, ttl_s: float | None = None) -> dict:
    """Pin the device-cached prefix of a prompt (on every executor holding it) or one prefix chain.

    Args:
        token_ids, cache_salt: the prompt; its cached leading full blocks are pinned.
        prefix: a prefix id from :func:`blockmgr.cache_index.list_prefixes` instead of a prompt.
        executor_id: only pin on this executor (prompt form).
        ttl_s: seconds until the pin expires (None: until unpinned).

    Returns:
        ``{"pins": [{"pin_id", "executor_id", "num_blocks", "num_tokens", "created_at", "expires_at"}]}``
        (times in Unix seconds).

    Raises:
        PinError: nothing cached (``not_cached``), over the cap (``pin_does_not_fit``: nothing is
            pinned), bad arguments (``invalid``).
    """
    if (token_ids is None) == (prefix is None):
        raise PinError("give either token_ids or a prefix id", "invalid")
    if ttl_s is not None and not 0 < ttl_s <= 365 * 86400:
        raise PinError(f"ttl_s must be in (0, 31536000], got {ttl_s}", "invalid")
    expire(manager)
    chains = _device_prefix(manager, token_ids, cache_salt, prefix, executor_id)
    for ex_id, chain in chains.items():
        ex = manager.executors[ex_id]
        total = len(pinned_blocks(ex) | {b for _, b in chain})
        limit = pin_limit(ex, manager.pin_share)
        if total > limit:
            raise PinError(f"pinning {len(chain)} blocks on executor {ex_id!r} would hold {total} pinned blocks, "
                           f"over the limit of {limit} ({manager.pin_share:.0%} of {ex.device.num_blocks})",
                           "pin_does_not_fit")
    now = time.time()
    out = []
    for ex_id, chain in chains.items():
        ex = manager.executors[ex_id]
        for _, b in chain:
            if ex.device.is_free(b):
                ex.device.take(b)
            else:
                ex.device.incref(b)
        pin_id = uuid.uuid4().hex[:16]
        record = {"pin_id": pin_id, "hashes": [h for h, _ in chain], "blocks": [b for _, b in chain],
                  "created_at": now, "expires_at": None if ttl_s is None else now + ttl_s}
        ex.pins[pin_id] = record
        manager._emit(["BlockPinned", ex_id, record["hashes"], pin_id, record["expires_at"]])
        out.append({"pin_id": pin_id, "executor_id": ex_id, "num_blocks": len(chain),
                    "num_tokens": len(chain) * ex.block_size, "created_at": now, "expires_at": record["expires_at"]})
    manager._flush_events()
    return {"pins": out}


def _release(manager, ex, pin_id: str, reason: str) -> None:
    record = ex.pins.pop(pin_id)
    for b in record["blocks"]:
        ex.device.decref(b)
    manager._emit(["BlockUnpinned", ex.executor_id, record["hashes"], pin_id, reason])


def unpin(manager, pin_id: str) -> dict:
    """Drop one pin.

    Returns:
        ``{"pin_id", "executor_id", "num_blocks"}``.

    Raises:
        PinError: no such pin (``unknown_pin``).
    """
    expire(manager)
    for ex in manager.executors.values():
        if pin_id in ex.pins:
            n = len(ex.pins[pin_id]["blocks"])
            _release(manager, ex, pin_id, "unpinned")
            manager._flush_events()
            return {"pin_id": pin_id, "executor_id": ex.executor_id, "num_blocks": n}
    raise PinError(f"no pin {pin_id!r}", "unknown_pin")


def expire(manager, now: float | None = None) -> list[str]:
    """Drop every pin whose TTL has run out; returns the executors that changed."""
    now = time.time() if now is None else now
    changed = []
    for ex in manager.executors.values():
        gone = [p for p, rec in ex.pins.items() if rec["expires_at"] is not None and rec["expires_at"] <= now]
        for pin_id in gone:
            _release(manager, ex, pin_id, "expired")
        if gone:
            changed.append(ex.executor_id)
    manager._flush_events()
    return changed


def list_pins(manager) -> list[dict]:
    """Every pin: ``{"pin_id", "executor_id", "num_blocks", "num_tokens", "created_at", "expires_at"}``."""
    expire(manager)
    return [{"pin_id": p, "executor_id": ex.executor_id, "num_blocks": len(rec["blocks"]),
             "num_tokens": len(rec["blocks"]) * ex.block_size, "created_at": rec["created_at"],
             "expires_at": rec["expires_at"]}
            for ex in manager.executors.values() for p, rec in ex.pins.items()]


def dropped_with(manager, ex) -> None:
    """An executor's state is being replaced (a new incarnation): announce its pins as gone."""
    for pin_id, record in ex.pins.items():
        manager._emit(["BlockUnpinned", ex.executor_id, record["hashes"], pin_id, "executor_restarted"])
