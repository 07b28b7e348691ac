"""Read-only views of an executor's prefix cache, and the per-prefix use records behind them.

Every cached block hash has a use record ``[hits, last_use, priority]``: how many admissions
reused it, when it was last stored or reused (Unix seconds) and the most important (smallest)
``priority`` of the requests that used it. The eviction policies (``blockmgr.eviction``) read it;
:func:`lookup` and :func:`list_prefixes` report it.

A *prefix chain* is a path of cached blocks from the first block of a prompt (parent
:data:`~blockmgr.block_hash.ROOT_HASH`) to a cached block with no cached child; its id is
``"<executor_id>:<hash of its last block as 16 hex digits>"``, which names the whole prefix because
block hashes are chained.
"""

from __future__ import annotations

import time

from blockmgr.block_hash import ROOT_HASH, hash_chain

TIER_DEVICE, TIER_CPU = "device", "cpu"


# ``ex.use`` values are tuples ``(hits, last_use, priority)``, replaced and never changed in place,
# so a snapshot may share them (BlockManager.snapshot(deferred=True)).


def record_store(ex, block_hash: int, priority: int) -> None:
    """A block was published to the prefix cache."""
    ex.use[block_hash] = (0, time.time(), priority)


def record_hit(ex, block_hash: int, priority: int) -> None:
    """An admission reused a cached block."""
    hits, _, lowest = ex.use.get(block_hash, (0, 0.0, priority))
    ex.use[block_hash] = (hits + 1, time.time(), min(lowest, priority))


def prefix_id(executor_id: str, block_hash: int) -> str:
    return f"{executor_id}:{block_hash:016x}"


def parse_prefix_id(pid: str) -> tuple[str, int]:
    """``(executor_id, last block hash)`` of a prefix id.

    Raises:
        ValueError: not ``<executor_id>:<16 hex digits>``.
    """
    ex_id, sep, digits = pid.rpartition(":")
    if not sep or not ex_id or len(digits) != 16:
        raise ValueError(f"prefix id {pid!r} is not '<executor_id>:<16 hex digits>'")
    return ex_id, int(digits, 16)


def cached_nodes(ex) -> dict[int, tuple[int, list[int], str, int]]:
    """Every cached hash of ``ex`` -> ``(parent hash, token ids, tier, block id)``."""
    nodes = {h: (p, t, TIER_DEVICE, b) for b, (h, p, t) in ex.cached_meta.items()}
    for b, (h, p, t) in ex.cpu_meta.items():
        nodes.setdefault(h, (p, t, TIER_CPU, b))
    return nodes


def chain_to(nodes: dict, leaf: int) -> list[int] | None:
    """Hashes from the root to ``leaf``, or None when an ancestor is not cached (unreachable)."""
    chain = []
    h = leaf
    while h != ROOT_HASH:
        node = nodes.get(h)
        if node is None:
            return None
        chain.append(h)
        h = node[0]
    chain.reverse()
    return chain


def pinned_hashes(ex) -> set[int]:
    return {h for pin in ex.pins.values() for h in pin["hashes"]}


def match_tiers(ex, token_ids: list[int], cache_salt: str | None) -> list[tuple[int, str, int]]:
    """The cached leading full blocks of ``token_ids`` on ``ex``: ``[(hash, tier, block id)]``."""
    extra = (cache_salt,) if cache_salt is not None else ()
    nodes = cached_nodes(ex)
    bs, out, parent = ex.block_size, [], ROOT_HASH
    for i, h in enumerate(hash_chain(token_ids, bs, extra)):
        node = nodes.get(h)
        # Token ids and parent are compared too, so a hash collision is a miss (see block_hash).
        if node is None or node[0] != parent or list(node[1]) != list(token_ids[i * bs : (i + 1) * bs]):
            break
        out.append((h, node[2], node[3]))
        parent = h
    return out


def lookup(manager, token_ids: list[int], cache_salt: str | None = None) -> dict[str, dict]:
    """Per executor, how many leading tokens of ``token_ids`` are cached, and where.

    Returns:
        ``{executor_id: {"cached_tokens", "device_tokens", "cpu_tokens", "pinned_tokens",
        "num_tokens", "block_size", "prefix_id"}}``; ``prefix_id`` names the longest cached
        prefix (None when nothing is cached). Counts are in tokens, whole blocks only.
    """
    out = {}
    for ex_id, ex in manager.executors.items():
        bs = ex.block_size
        hits = match_tiers(ex, token_ids, cache_salt) if manager.enable_prefix_caching else []
        pinned = pinned_hashes(ex)
        out[ex_id] = {
            "cached_tokens": len(hits) * bs,
            "device_tokens": sum(bs for _, tier, _ in hits if tier == TIER_DEVICE),
            "cpu_tokens": sum(bs for _, tier, _ in hits if tier == TIER_CPU),
            "pinned_tokens": sum(bs for h, _, _ in hits if h in pinned),
            "num_tokens": len(token_ids),
            "block_size": bs,
            "prefix_id": prefix_id(ex_id, hits[-1][0]) if hits else None,
        }
    return out


def list_prefixes(manager, executor_id: str | None = None, offset: int = 0, limit: int = 50,
                  max_tokens: int = 32) -> dict:
    """The cached prefix chains, most hit first, then most recently used.

    Args:
        executor_id: only this executor's chains (default: all).
        offset, limit: paging over the sorted list (``limit`` in 1..1000).
        max_tokens: how many leading token ids of each chain to return (0..1024).

    Returns:
        ``{"total": n, "prefixes": [{"id", "executor_id", "first_token_ids", "num_blocks",
        "num_tokens", "hits", "partial_hits", "last_use", "pinned", "pinned_blocks", "tier"}]}``:
        ``hits`` counts admissions that reused the whole chain, ``partial_hits`` those that reused
        at least its first block, ``last_use`` is Unix seconds, ``pinned`` is true
        when every block is pinned (``pinned_blocks`` counts them; a pinned prompt may be the start
        of a longer chain), ``tier`` is ``device``, ``cpu`` or ``mixed``.

    Raises:
        ValueError: ``offset``, ``limit`` or ``max_tokens`` out of range.
    """
    if offset < 0 or not 1 <= limit <= 1000 or not 0 <= max_tokens <= 1024:
        raise ValueError(f"offset must be >= 0, limit in 1..1000, max_tokens in 0..1024 "
                         f"(got {offset}, {limit}, {max_tokens})")
    entries = []
    for ex_id, ex in manager.executors.items():
        if executor_id is not None and ex_id != executor_id:
            continue
        nodes = cached_nodes(ex)
        parents = {p for p, *_ in nodes.values()}
        pinned = pinned_hashes(ex)
        for leaf in nodes:
            if leaf in parents:
                continue
            chain = chain_to(nodes, leaf)
            if chain is None:
                continue
            tiers = {nodes[h][2] for h in chain}
            tokens = [t for h in chain for t in nodes[h][1]][:max_tokens]
            use = ex.use.get(leaf, [0, 0.0, 0])
            entries.append({
                "id": prefix_id(ex_id, leaf), "executor_id": ex_id, "first_token_ids": tokens,
                "num_blocks": len(chain), "num_tokens": len(chain) * ex.block_size, "hits": use[0],
                "partial_hits": ex.use.get(chain[0], [0])[0],
                "last_use": max(ex.use.get(h, [0, 0.0])[1] for h in chain),
                "pinned": all(h in pinned for h in chain),
                "pinned_blocks": sum(1 for h in chain if h in pinned),
                "tier": tiers.pop() if len(tiers) == 1 else "mixed",
            })
    entries.sort(key=lambda e: (-e["hits"], -e["last_use"], e["id"]))
    return {"total": len(entries), "prefixes": entries[offset : offset + limit]}


# One character per block, so a 10k-block pool is a 10 kB string.
MAP_FREE, MAP_USED, MAP_CACHED, MAP_PINNED = ".", "u", "c", "p"


def block_map(manager) -> dict[str, dict]:
    """Per executor, each block's state as one character per block, for the cache page.

    Returns:
        ``{executor_id: {"device": str, "cpu": str}}``; in ``device``: ``.`` free, ``c`` free but
        holding a cached prefix, ``u`` in use, ``p`` pinned (possibly also in use); in ``cpu``:
        ``.`` free, ``c`` a prefix block of the CPU tier, ``u`` a swapped-out sequence's block.
    """
    out = {}
    for ex_id, ex in manager.executors.items():
        pinned = {b for pin in ex.pins.values() for b in pin["blocks"]}
        dev = ex.device
        device = "".join(
            MAP_PINNED if b in pinned else MAP_USED if not dev.is_free(b) else
            MAP_CACHED if b in ex.cached_meta else MAP_FREE for b in range(dev.num_blocks))
        cpu = "".join(
            MAP_USED if not ex.cpu.is_free(b) else MAP_CACHED if b in ex.cpu_meta else MAP_FREE
            for b in range(ex.cpu.num_blocks))
        out[ex_id] = {"device": device, "cpu": cpu}
    return out
