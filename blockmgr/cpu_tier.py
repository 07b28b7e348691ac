"""The CPU tier of the prefix cache: cached device blocks that are evicted move to the CPU pool.

When an allocation takes a free device block that still holds a cached prefix, the block's K/V is
copied to a free CPU block (a ``swap_out`` op of the step's reply) instead of being dropped, if
the executor's cost model says that copying one block back later beats recomputing its tokens
(``CostModel.prefer_swap_in``; the PagedAttention paper's swap-vs-recompute trade-off, Kwon et al.
SOSP 2023, section 4.5). A later admission whose prefix chain continues on the CPU tier gets new
device blocks and ``swap_in`` ops for them, and those tokens count as cached.

CPU-tier blocks stay *free* in the CPU pool (refcount 0, in its LRU free queue), so preemption's
swap-out can always claim them; a claimed or reused CPU block drops its prefix
(``BlockRemoved``). A block moving between tiers is announced as ``BlockMoved``.

Ordering within one step: the executor applies every ``swap_out`` before every ``swap_in``. So a
CPU block read by a ``swap_in`` of this step must not be written by a ``swap_out`` of the same
step: such blocks are held (refcount 1) until the step ends (``hold`` / ``release_held``).
"""

from __future__ import annotations

from blockmgr import cache_index


def worth_keeping(ex) -> bool:
    """A device block's prefix should move to the CPU pool (room there, and cheaper than recompute)."""
    return ex.cpu.num_free > 0 and ex.cost.prefer_swap_in(1, ex.block_size)


def claim(manager, ex, cpu_blocks: list[int]) -> None:
    """CPU blocks just taken for other data lose the prefixes they held."""
    gone = []
    for c in cpu_blocks:
        meta = ex.cpu_meta.pop(c, None)
        if meta is not None:
            del ex.cpu_cache[meta[0]]
            ex.use.pop(meta[0], None)
            gone.append(meta[0])
    if gone:
        manager._emit(["BlockRemoved", ex.executor_id, gone])


def move_out(manager, ex, moves: list[tuple[int, tuple]], swap_out: list) -> list[int]:
    """Move evicted device blocks ``[(block, (hash, parent, tokens))]`` to the CPU tier while it is
    worth it; appends the copies to ``swap_out`` and returns the hashes that were dropped instead."""
    moved, dropped = [], []
    for b, meta in moves:
        if not worth_keeping(ex):
            dropped.append(meta[0])
            continue
        (c,) = ex.cpu.allocate(1)
        claim(manager, ex, [c])
        ex.cpu.decref(c)  # free again (back of the queue), but now holding the prefix
        ex.cpu_cache[meta[0]] = c
        ex.cpu_meta[c] = meta
        swap_out.append([b, c])
        moved.append(meta[0])
    if moved:
        ex.counters["cpu_tier_out_blocks"] += len(moved)
        manager._emit(["BlockMoved", ex.executor_id, moved, cache_index.TIER_DEVICE, cache_index.TIER_CPU])
    return dropped


def continue_chain(ex, hashes: list[int], prompt: list[int], start: int) -> list[int]:
    """CPU blocks holding ``hashes[start:]`` in order, as far as the chain goes (tokens verified)."""
    bs, out = ex.block_size, []
    for i in range(start, len(hashes)):
        c = ex.cpu_cache.get(hashes[i])
        if c is None:
            break
        _, parent, tokens = ex.cpu_meta[c]
        if parent != (hashes[i - 1] if i else 0) or list(tokens) != prompt[i * bs : (i + 1) * bs]:
            break
        out.append(c)
    return out


def hold(ex, cpu_blocks: list[int], held: list[int]) -> None:
    """Keep CPU blocks read by this step's ``swap_in`` from being reused before the step ends."""
    for c in cpu_blocks:
        ex.cpu.take(c)
    held.extend(cpu_blocks)


def bring_in(manager, ex, cpu_blocks: list[int], device_blocks: list[int], swap_in: list) -> None:
    """The prefixes of held ``cpu_blocks`` now live in ``device_blocks`` (copied by ``swap_in``)."""
    hashes = []
    for c, d in zip(cpu_blocks, device_blocks):
        meta = ex.cpu_meta.pop(c)
        del ex.cpu_cache[meta[0]]
        ex.cache[meta[0]] = d
        ex.cached_meta[d] = meta
        swap_in.append([c, d])
        hashes.append(meta[0])
    if hashes:
        ex.counters["cpu_tier_in_blocks"] += len(hashes)
        manager._emit(["BlockMoved", ex.executor_id, hashes, cache_index.TIER_CPU, cache_index.TIER_DEVICE])


def release_held(ex, held: list[int]) -> None:
    for c in held:
        ex.cpu.decref(c)
    held.clear()
