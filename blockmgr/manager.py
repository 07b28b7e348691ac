"""The block manager's state machine: pools, block tables, prefix cache, forks and preemption.

Pure Python with no I/O, so the service (``blockmgr.server``) and the in-process client used by
tests share exactly this code. One executor's whole state is an :class:`ExecutorState`.

A scheduler step of an executor arrives as one batched request (:meth:`BlockManager.step`) and is
applied in this order:

1. ``fork``: children point at their parent's blocks (refcounts rise; copy-on-write later);
2. ``free``: finished or aborted sequences release their blocks; full computed blocks stay in the
   prefix cache at the back of the LRU free queue;
3. ``grow``: running sequences get room for this step's tokens. A write into a block shared with
   another sequence first copies it (copy-on-write). When the pool runs dry, victims are preempted
   (``blockmgr.preemption``): swapped out to the CPU pool or dropped for recompute;
4. ``swap_in``: swapped sequences come back (only above the watermark);
5. ``admit``: new sequences look up the prefix cache, then get blocks (only above the watermark).

A sequence's K/V for the tokens granted in step *k* is computed before the executor runs step
*k+1*'s forward pass, and the executor carries out step *k+1*'s reply (copies, swaps, new blocks,
prefix-cache hits) only after step *k*'s forward pass; so step *k+1* is when the newly full blocks
are hashed and published to the prefix cache, even where the executor sends step *k+1* while step
*k*'s forward pass runs (pipelined scheduling, ``executor.engine``).

Pipelined, a decode's grow is sent before the token it grants a slot to has been sampled: the
entry carries :data:`blockmgr.protocol.PENDING` for it, and the sequence's next grow gives the
id (the entry's ``token_ids`` start at the first position whose id the block manager lacks),
even in the step that frees it. A block holding a pending id is not hashed (a sequence freed
with one never computed, its sampling having ended it, leaves that block out of the cache).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from blockmgr.block_hash import ROOT_HASH, hash_block, hash_chain
from blockmgr import cache_index, cpu_tier, pins
from blockmgr.block_pool import BlockPool
from blockmgr.eviction import POLICIES, make_evictor
from blockmgr.preemption import CostModel, victim_order
from blockmgr.protocol import PENDING

log = logging.getLogger("pagedserve.blockmgr")

DENIED_NO_SPACE = "no_space"  # try again after other sequences free blocks
DENIED_NEVER_FITS = "never_fits"  # larger than the whole pool: refuse the request

COUNTERS = (
    "prefix_queries_blocks", "prefix_hits_blocks", "prefix_queries_tokens", "prefix_hits_tokens",
    "evictions", "swap_out_blocks", "swap_in_blocks", "preemptions_swap", "preemptions_recompute",
    "copy_on_write", "cpu_tier_out_blocks", "cpu_tier_in_blocks",
)


class BlockManagerError(Exception):
    """A request the block manager cannot act on (unknown executor or sequence, bad arguments)."""


class StaleIncarnationError(BlockManagerError):
    """A message from an executor process that a newer process with the same executor id replaced.

    Its KV cache is no longer the one the block manager books; obeying it would hand out blocks
    the new process never wrote. The old process must stop.
    """


class UnknownExecutorError(BlockManagerError):
    """The executor id is not registered (never was, or the block manager restarted without Redis)."""


# Fenced incarnations remembered per executor id: enough for a crash loop to be refused.
RETIRED_INCARNATIONS_KEPT = 16


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``."""
    return -(-num_tokens // block_size)


@dataclass
class Sequence:
    """One sequence as the block manager sees it.

    ``tokens`` always has ``num_tokens`` entries: the ids whose K/V slots were granted, the last
    ones :data:`PENDING` where the executor has not reported them yet (:attr:`num_known` are not).
    """

    seq_id: str
    block_table: list[int] = field(default_factory=list)  # device blocks while running
    cpu_table: list[int] = field(default_factory=list)  # CPU blocks while swapped out
    tokens: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # leading full computed blocks
    cache_salt: str | None = None
    priority: int = 0
    arrival: int = 0
    swapped: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_known(self) -> int:
        """Leading tokens whose ids are known (the rest are :data:`PENDING`)."""
        n = len(self.tokens)
        while n and self.tokens[n - 1] == PENDING:
            n -= 1
        return n

    @property
    def extra_keys(self) -> tuple:
        return (self.cache_salt,) if self.cache_salt is not None else ()

    def to_wire(self) -> list:
        return [self.seq_id, self.block_table, self.cpu_table, self.tokens, self.block_hashes,
                self.cache_salt, self.priority, self.arrival, self.swapped]

    @classmethod
    def from_wire(cls, w: list) -> "Sequence":
        return cls(*w)


@dataclass
class ExecutorState:
    executor_id: str
    block_size: int
    device: BlockPool
    cpu: BlockPool
    watermark_blocks: int = 0
    cost: CostModel = field(default_factory=CostModel)
    seqs: dict[str, Sequence] = field(default_factory=dict)
    cache: dict[int, int] = field(default_factory=dict)  # block hash -> device block
    # device block -> (hash, parent hash, token ids), for blocks that are in the prefix cache
    cached_meta: dict[int, tuple[int, int, list[int]]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    use: dict[int, tuple] = field(default_factory=dict)  # block hash -> (hits, last_use, priority)
    pins: dict[str, dict] = field(default_factory=dict)  # pin id -> record (blockmgr.pins)
    cpu_cache: dict[int, int] = field(default_factory=dict)  # block hash -> CPU block (the CPU tier)
    cpu_meta: dict[int, tuple[int, int, list[int]]] = field(default_factory=dict)  # CPU block -> meta
    last_step_id: int | None = None
    last_reply: dict | None = None
    incarnation: str | None = None  # the registered process; None: a client that sends none
    retired: list[str] = field(default_factory=list)  # replaced incarnations, refused from now on
    # Per executor (not global), so replaying one executor's log rebuilds exactly its arrivals.
    next_arrival: int = 0

    def running(self):
        return [s for s in self.seqs.values() if not s.swapped and s.block_table]


@dataclass
class _StepReply:
    updates: dict[str, list] = field(default_factory=dict)
    denied: dict[str, str] = field(default_factory=dict)
    admitted: dict[str, int] = field(default_factory=dict)
    preempted: dict[str, str] = field(default_factory=dict)
    swapped_in: list[str] = field(default_factory=list)
    swap_out: list[list[int]] = field(default_factory=list)
    swap_in: list[list[int]] = field(default_factory=list)
    copies: list[list[int]] = field(default_factory=list)
    # Every copy in the order it was decided, consecutive ones of a kind grouped:
    # [[kind, [[src, dst], ...]], ...]. Only this order is right: a block copied on write may be
    # swapped out later in the same step, and a block swapped out may then be a copy's target.
    # The pairs of one group are independent (no block written twice, none read after or before
    # a write of it), because the executor runs a group as one parallel kernel launch (the Triton
    # copy/swap kernels) with no order inside it; see add_ops.
    ops: list[list] = field(default_factory=list)
    grown_from: dict[str, int] = field(default_factory=dict)  # seq -> num_tokens before this step
    cpu_held: list[int] = field(default_factory=list)  # CPU blocks read by this step (blockmgr.cpu_tier)
    group_io: tuple[set, set] | None = None  # (sources, destinations) of the last group of ops

    def add_ops(self, kind: str, pairs: list[list[int]]) -> None:
        """Append copies ``[[src, dst], ...]`` of one kind (``copy``, ``swap_out``, ``swap_in``).

        A pair joins the last group when that group has the same kind and no hazard with it; else
        it starts a new group. Hazards: the pair writes a block the group writes (two swap-outs of
        one step can reuse a CPU block: the CPU tier frees one whose prefix a later allocation
        claims); for ``copy``, whose sources and destinations are both device blocks, also reading
        a block the group writes or writing one it reads.
        """
        getattr(self, "copies" if kind == "copy" else kind).extend(pairs)
        for src, dst in pairs:
            last = self.ops[-1] if self.ops and self.ops[-1][0] == kind else None
            if last is not None:
                srcs, dsts = self.group_io
                hazard = dst in dsts or (kind == "copy" and (src in dsts or dst in srcs))
            if last is None or hazard:
                last = [kind, []]
                self.ops.append(last)
                self.group_io = (set(), set())
            last[1].append([src, dst])
            self.group_io[0].add(src)
            self.group_io[1].add(dst)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("grown_from", "cpu_held", "group_io")}


class DeferredRows:
    """The rows ``[key, *value]`` of a dict whose values are tuples never changed in place (the
    prefix-cache maps), from a shallow copy taken now (one C call, no object per entry) and built
    only when read, a slice at a time.

    Args:
        mapping: ``{key: tuple}``; copied shallowly.
    """

    def __init__(self, mapping: dict):
        self._copy = dict(mapping)

    def __len__(self) -> int:
        return len(self._copy)

    def slices(self, size: int):
        """Lists of at most ``size`` rows, in the dict's order."""
        items = iter(self._copy.items())
        while piece := [[k, *v] for k, v in itertools.islice(items, size)]:
            yield piece

    def rows(self) -> list[list]:
        return [[k, *v] for k, v in self._copy.items()]


class BlockManager:
    """Holds every registered executor's block pools, block tables and prefix cache.

    Args:
        watermark: fraction of each device pool kept free when admitting new sequences or
            swapping sequences back in (vLLM's default is 1%), so that an admission does not
            force an immediate preemption.
        enable_prefix_caching: publish computed full blocks and reuse them across requests.
        on_events: called with a list of KV events after each change to a prefix cache
            (``["BlockStored", executor_id, hashes, parent_hash, token_ids, block_size]``,
            ``["BlockRemoved", executor_id, hashes]``, ``["AllBlocksCleared", executor_id]``, and
            the pin and tier events of ``blockmgr.protocol``).
        eviction: which cached free block is reused first: ``lru``, ``lfu`` or ``priority``
            (``blockmgr.eviction``).
        pin_share: most of each device pool that pins may hold (``blockmgr.pins``).

    Raises:
        BlockManagerError: watermark outside [0, 1), pin_share outside [0, 1], unknown policy.
    """

    def __init__(self, watermark: float = 0.01, enable_prefix_caching: bool = True, on_events=None,
                 eviction: str = "lru", pin_share: float = 0.5) -> None:
        if not 0 <= watermark < 1:
            raise BlockManagerError(f"watermark must be in [0, 1), got {watermark}")
        if not 0 <= pin_share <= 1:
            raise BlockManagerError(f"pin_share must be in [0, 1], got {pin_share}")
        if eviction not in POLICIES:
            raise BlockManagerError(f"unknown eviction policy {eviction!r}; expected one of {', '.join(POLICIES)}")
        self.eviction = eviction
        self.pin_share = pin_share
        self.watermark = watermark
        self.enable_prefix_caching = enable_prefix_caching
        self.executors: dict[str, ExecutorState] = {}
        self.on_events = on_events
        self._events: list[list] = []
        # Set by blockmgr.persistence: reports its health, shown in every executor's stats.
        self.persistence: Callable[[], dict] | None = None

    # -- registration -------------------------------------------------------------------------
    def register(self, executor_id: str, num_device_blocks: int, block_size: int, num_cpu_blocks: int = 0,
                 cost: dict | None = None, incarnation: str | None = None) -> dict:
        """Register an executor process's pools.

        Each executor process registers with a fresh ``incarnation`` id. The same incarnation
        registering again (a reconnect after a network blip or a block-manager restart) with the
        same geometry keeps its state. A new incarnation of a known executor id means the old
        process is gone and its KV cache with it: every sequence, block and prefix-cache entry of
        the old one is dropped (``AllBlocksCleared`` is published), and the old incarnation is
        fenced: its messages are refused from now on. Without an incarnation (older clients), the
        same geometry resumes and a different one starts over.

        Args:
            cost: the executor's measured :class:`~blockmgr.preemption.CostModel` fields.
            incarnation: an id unique to this executor process (e.g. a UUID).

        Returns:
            ``{"resumed": bool, "num_seqs": int, "dropped_seqs": int}``: whether the state was
            kept, how many sequences it holds, and how many of an old incarnation were dropped.

        Raises:
            BlockManagerError: non-positive block size or negative pool sizes.
            StaleIncarnationError: ``incarnation`` was already replaced by a newer one.
        """
        if block_size <= 0 or num_device_blocks < 0 or num_cpu_blocks < 0:
            raise BlockManagerError(
                f"invalid pool geometry: block_size={block_size}, device={num_device_blocks}, cpu={num_cpu_blocks}"
            )
        cost_model = CostModel(**(cost or {}))
        old = self.executors.get(executor_id)
        if old is not None and incarnation is not None and incarnation in old.retired:
            raise StaleIncarnationError(self._stale_message(old, incarnation))
        if (
            old is not None
            and old.incarnation == incarnation
            and old.block_size == block_size
            and old.device.num_blocks == num_device_blocks
            and old.cpu.num_blocks == num_cpu_blocks
        ):
            old.cost = cost_model
            log.info("executor %s (incarnation %s) re-registered; keeping %d sequences",
                     executor_id, incarnation, len(old.seqs))
            return {"resumed": True, "num_seqs": len(old.seqs), "dropped_seqs": 0}
        retired, dropped = [], 0
        if old is not None:
            dropped = len(old.seqs)
            retired = list(old.retired)
            if old.incarnation is not None and old.incarnation != incarnation:
                retired = (retired + [old.incarnation])[-RETIRED_INCARNATIONS_KEPT:]
            pins.dropped_with(self, old)
            self._emit(["AllBlocksCleared", executor_id])
            log.warning(
                "executor %s: incarnation %s replaces %s; dropped its %d sequences, %d used blocks and "
                "%d prefix-cache entries", executor_id, incarnation, old.incarnation, dropped,
                old.device.num_used, len(old.cache),
            )
        self.executors[executor_id] = self._with_policy(ExecutorState(
            executor_id, block_size, BlockPool(num_device_blocks), BlockPool(num_cpu_blocks),
            watermark_blocks=int(self.watermark * num_device_blocks), cost=cost_model,
            incarnation=incarnation, retired=retired,
        ))
        log.info(
            "executor %s registered (incarnation %s): %d device blocks, %d cpu blocks, block_size %d",
            executor_id, incarnation, num_device_blocks, num_cpu_blocks, block_size,
        )
        self._flush_events()
        return {"resumed": False, "num_seqs": 0, "dropped_seqs": dropped}

    @staticmethod
    def _stale_message(ex: ExecutorState, incarnation: str) -> str:
        return (f"executor {ex.executor_id!r}: incarnation {incarnation!r} was replaced by incarnation "
                f"{ex.incarnation!r}; its blocks are gone and its messages are refused (stop this process)")

    def _fenced(self, executor_id: str, incarnation: str | None) -> ExecutorState:
        """The executor's state, if ``incarnation`` is the registered one (or None)."""
        ex = self._executor(executor_id)
        if incarnation is not None and ex.incarnation is not None and incarnation != ex.incarnation:
            raise StaleIncarnationError(self._stale_message(ex, incarnation))
        return ex

    def _with_policy(self, ex: ExecutorState) -> ExecutorState:
        def use_of(block):
            meta = ex.cached_meta.get(block)
            return None if meta is None else ex.use.get(meta[0], (0, 0.0, 0))

        ex.device.use_evictor(make_evictor(self.eviction, use_of))
        return ex

    def _executor(self, executor_id: str) -> ExecutorState:
        try:
            return self.executors[executor_id]
        except KeyError:
            raise UnknownExecutorError(f"unknown executor {executor_id!r}; register it first") from None

    def _seq(self, ex: ExecutorState, seq_id: str) -> Sequence:
        try:
            return ex.seqs[seq_id]
        except KeyError:
            raise BlockManagerError(f"unknown sequence {seq_id!r} on executor {ex.executor_id!r}") from None

    # -- one scheduler step ---------------------------------------------------------------------
    def step(
        self,
        executor_id: str,
        *,
        step_id: int | None = None,
        fork: list[tuple[str, str]] = (),
        free: list[str] = (),
        grow: list[tuple[str, int, list[int]]] = (),
        swap_in: list[str] = (),
        admit: list[tuple[str, list[int], int, str | None, int]] = (),
        incarnation: str | None = None,
    ) -> dict:
        """Apply one scheduler step's batched request (see the module docstring for the order).

        Args:
            step_id: the executor's step counter; a retried step with the same id gets the reply
                it already had (so a retry after a lost reply is not applied twice).
            fork: ``(parent, child)`` pairs; the child shares all of the parent's blocks.
            free: sequences to release (unknown ids are ignored).
            grow: ``(seq_id, num_tokens, token_ids)``: the sequence will hold ``num_tokens``
                tokens after this step; ``token_ids`` are the ids from its first position whose
                id the block manager lacks (past what it held before, unless it holds
                :data:`PENDING` ids), any last ones :data:`PENDING`. A sequence also in ``free``
                may only have its pending ids given (``num_tokens`` = what it holds), before the
                free publishes its blocks.
            swap_in: swapped-out sequences to bring back to the device.
            admit: ``(seq_id, prompt_token_ids, num_new_tokens, cache_salt, priority)``: a new
                sequence; after the prefix-cache lookup it gets room for ``num_new_tokens`` more
                tokens of its prompt.
            incarnation: the sending process's incarnation (see :meth:`register`); None skips
                the check.

        Returns:
            ``updates`` ``{seq: [start, block ids]}`` (set ``block_table[start:]``), ``denied``
            ``{seq: "no_space" | "never_fits"}``, ``admitted`` ``{seq: num_cached_tokens}``,
            ``preempted`` ``{seq: "swap" | "recompute"}``, ``swapped_in`` [seq], and the block
            copies to carry out before the forward pass: ``ops`` ``[[kind, [[src, dst], ...]],
            ...]`` in the order they must run (kind ``"swap_out"``: device -> CPU block,
            ``"swap_in"``: CPU -> device, ``"copy"``: device -> device, copy-on-write; the pairs of
            one group are independent of each other), and the same pairs by kind, for
            inspection: ``swap_out``, ``swap_in``, ``copies``.

        Raises:
            BlockManagerError: unknown executor or sequence, malformed entries.
            UnknownExecutorError: the executor is not registered, or its state misses steps
                (``step_id`` beyond the last one + 1: restored from stale storage), in which
                case the state is dropped so that it registers afresh.
            StaleIncarnationError: ``incarnation`` is not the registered one.
        """
        ex = self._fenced(executor_id, incarnation)
        if step_id is not None and step_id == ex.last_step_id and ex.last_reply is not None:
            log.info("executor %s retried step %s; answering it again", executor_id, step_id)
            return ex.last_reply
        if step_id is not None and ex.last_step_id is not None and step_id > ex.last_step_id + 1:
            # Steps were applied that this state never saw: it was restored from a store that
            # missed them (Redis was down). Obeying it would hand out blocks in use; start over.
            del self.executors[executor_id]
            self._emit(["AllBlocksCleared", executor_id])
            self._flush_events()
            log.error("executor %s sent step %d but this state ends at step %d (restored from stale storage); "
                      "dropped it, the executor must register again", executor_id, step_id, ex.last_step_id)
            raise UnknownExecutorError(
                f"executor {executor_id!r}: step {step_id} follows step {ex.last_step_id} here; this state missed "
                f"steps (restored from stale storage) and was dropped; register again")
        self._validate_step(ex, fork, free, grow, swap_in, admit)
        r = _StepReply()
        for parent, child in fork:
            self._fork(ex, parent, child)
        freed = set(free)
        for seq_id, _, token_ids in grow:
            if seq_id in freed and seq_id in ex.seqs:  # its last ids, so that its blocks are published
                self._settle(ex.seqs[seq_id], token_ids)
        for seq_id in free:
            self._free(ex, seq_id)
        for seq_id, num_tokens, token_ids in grow:
            if seq_id in freed:
                continue
            if seq_id in r.preempted:
                if seq_id in ex.seqs:  # swapped out: it keeps the ids of what it held
                    self._settle(ex.seqs[seq_id], token_ids)
                continue
            seq = ex.seqs[seq_id]
            new_ids = self._settle(seq, token_ids)
            self._publish(ex, seq)  # last step's tokens are computed by now
            self._grow(ex, seq, new_ids, r)
        for seq_id in swap_in:
            self._swap_in(ex, self._seq(ex, seq_id), r)
        for seq_id, prompt, num_new, salt, priority in admit:
            self._admit(ex, seq_id, list(prompt), int(num_new), salt, int(priority), r)
        cpu_tier.release_held(ex, r.cpu_held)
        reply = r.to_dict()
        ex.last_step_id, ex.last_reply = step_id, reply
        self._flush_events()
        return reply

    def _validate_step(self, ex: ExecutorState, fork, free, grow, swap_in, admit) -> None:
        """Refuse a malformed step before changing anything, so a refusal leaves no half-applied step."""
        known = {sid: s.swapped for sid, s in ex.seqs.items()}
        for parent, child in fork:
            if known.get(parent, True):
                raise BlockManagerError(f"fork: parent {parent!r} is unknown or swapped out")
            if parent in ex.seqs and ex.seqs[parent].num_known < ex.seqs[parent].num_tokens:
                # The child would share the slot whose id the parent owes, and each would give its own.
                raise BlockManagerError(f"fork: parent {parent!r} holds pending ids; give them first")
            if child in known:
                raise BlockManagerError(f"fork: child {child!r} already exists")
            known[child] = False
        freed = set(free)
        for seq_id in free:
            known.pop(seq_id, None)
        for key, ids in (("grow", [g[0] for g in grow]), ("swap_in", swap_in)):
            if len(set(ids)) != len(ids):
                twice = sorted({s for s in ids if ids.count(s) > 1})
                raise BlockManagerError(f"{key}: sequence(s) {twice} listed more than once in one step")
        for seq_id, num_tokens, token_ids in grow:
            if seq_id in freed:
                if seq_id not in ex.seqs or (ex.seqs[seq_id].num_tokens != num_tokens):
                    raise BlockManagerError(f"grow {seq_id!r}: a sequence freed in the same step may only have "
                                            f"the ids it holds as pending given")
            elif seq_id not in known:
                raise BlockManagerError(f"grow: unknown sequence {seq_id!r} on executor {ex.executor_id!r}")
            elif known[seq_id]:
                raise BlockManagerError(f"grow: sequence {seq_id!r} is swapped out; swap it in first")
            # A child forked in this step starts as its parent.
            seq = ex.seqs[seq_id] if seq_id in ex.seqs else ex.seqs[next(p for p, c in fork if c == seq_id)]
            ids_held = seq.num_known
            if num_tokens != ids_held + len(token_ids) or num_tokens < seq.num_tokens:
                raise BlockManagerError(
                    f"grow {seq_id!r}: {ids_held} known tokens + {len(token_ids)} ids != {num_tokens} "
                    f"(or fewer than the {seq.num_tokens} it holds)")
            first_pending = next((i for i, t in enumerate(token_ids) if t == PENDING), len(token_ids))
            if any(t != PENDING for t in token_ids[first_pending:]):
                raise BlockManagerError(f"grow {seq_id!r}: a pending id (-1) before a known one")
        for seq_id in swap_in:
            if not known.get(seq_id, False):
                raise BlockManagerError(f"swap_in: {seq_id!r} is unknown or not swapped out")
        for seq_id, prompt, num_new, _salt, _prio in admit:
            if seq_id in known:
                raise BlockManagerError(f"admit: sequence {seq_id!r} already exists")
            if not prompt or num_new < 1:
                raise BlockManagerError(f"admit {seq_id!r}: empty prompt or num_new_tokens < 1")
            known[seq_id] = False

    def _allocate(self, ex: ExecutorState, n: int, r: _StepReply) -> list[int]:
        """Take ``n`` free device blocks, evicting the prefix-cache entries they still carry (to the
        CPU tier when it is worth it: ``blockmgr.cpu_tier``)."""
        blocks = ex.device.allocate(n)
        moves = []
        for b in blocks:
            meta = ex.cached_meta.pop(b, None)
            if meta is not None:
                del ex.cache[meta[0]]
                moves.append((b, meta))
        evicted = cpu_tier.move_out(self, ex, moves, r) if moves else []
        for h in evicted:
            ex.use.pop(h, None)
        if evicted:
            ex.counters["evictions"] += len(evicted)
            self._emit(["BlockRemoved", ex.executor_id, evicted])
        return blocks

    def _publish(self, ex: ExecutorState, seq: Sequence) -> None:
        """Hash the sequence's newly full blocks and add them to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = ex.block_size
        full = min(seq.num_known // bs, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
        stored, stored_tokens, first_parent = [], [], parent
        for i in range(len(seq.block_hashes), full):
            tokens = seq.tokens[i * bs : (i + 1) * bs]
            h = hash_block(parent, tokens, seq.extra_keys)
            seq.block_hashes.append(h)
            b = seq.block_table[i]
            if h in ex.cpu_cache and b not in ex.cached_meta:  # recomputed: the device copy wins
                cpu_tier.claim(self, ex, [ex.cpu_cache[h]])
            if h not in ex.cache and b not in ex.cached_meta:
                ex.cache[h] = b
                ex.cached_meta[b] = (h, parent, tokens)
                cache_index.record_store(ex, h, seq.priority)
                if not stored:
                    first_parent = parent
                stored.append(h)
                stored_tokens.extend(tokens)
            parent = h
        if stored:
            self._emit(["BlockStored", ex.executor_id, stored, first_parent, stored_tokens, bs])

    def _lookup(self, ex: ExecutorState, hashes: list[int], tokens: list[int]) -> list[int]:
        """Cached device blocks for the leading ``hashes``, verified against their token ids."""
        bs, hits, parent = ex.block_size, [], ROOT_HASH
        for i, h in enumerate(hashes):
            b = ex.cache.get(h)
            if b is None:
                break
            _, cached_parent, cached_tokens = ex.cached_meta[b]
            if cached_parent != parent or cached_tokens != tokens[i * bs : (i + 1) * bs]:
                log.warning("block hash collision on executor %s (hash %x); treating it as a miss", ex.executor_id, h)
                break
            hits.append(b)
            parent = h
        return hits

    @staticmethod
    def _settle(seq: Sequence, token_ids: list[int]) -> list[int]:
        """Put a grow entry's ids for the positions ``seq`` holds as pending in place; returns the
        entry's ids past what it holds."""
        held, known = seq.num_tokens, seq.num_known
        seq.tokens[known:held] = token_ids[: held - known]
        return list(token_ids[held - known :])

    def _grow(self, ex: ExecutorState, seq: Sequence, token_ids: list[int], r: _StepReply) -> None:
        bs = ex.block_size
        old_len = seq.num_tokens
        new_len = old_len + len(token_ids)
        if blocks_for(new_len, bs) > ex.device.num_blocks:
            r.denied[seq.seq_id] = DENIED_NEVER_FITS
            return
        write_block = old_len // bs
        cow = (
            new_len > old_len
            and write_block < len(seq.block_table)
            and ex.device.refcount[seq.block_table[write_block]] > 1
        )
        need = max(0, blocks_for(new_len, bs) - len(seq.block_table)) + (1 if cow else 0)
        while ex.device.num_free < need:
            victims = [v for v in victim_order(ex.running())]
            victim = next((v for v in victims if v is not seq), None)
            if victim is None or victim_order([seq, victim])[0] is seq:
                # The sequence itself is the least important one left: it yields.
                self._preempt(ex, seq, r)
                return
            self._preempt(ex, victim, r)
        start = len(seq.block_table)
        if cow:
            (dst,) = self._allocate(ex, 1, r)
            src = seq.block_table[write_block]
            ex.device.decref(src)
            seq.block_table[write_block] = dst
            r.add_ops("copy", [[src, dst]])
            ex.counters["copy_on_write"] += 1
            start = write_block
        if need - (1 if cow else 0) > 0:
            seq.block_table.extend(self._allocate(ex, need - (1 if cow else 0), r))
        r.grown_from[seq.seq_id] = old_len
        seq.tokens.extend(token_ids)
        if start < len(seq.block_table):
            r.updates[seq.seq_id] = [start, seq.block_table[start:]]

    def _preempt(self, ex: ExecutorState, seq: Sequence, r: _StepReply) -> None:
        """Swap ``seq`` out to the CPU pool or drop it for recompute, by the cost model."""
        if seq.seq_id in r.grown_from:
            # Granted earlier in this very step: take back this step's room first.
            del seq.tokens[r.grown_from.pop(seq.seq_id) :]
            r.updates.pop(seq.seq_id, None)
            keep = blocks_for(seq.num_tokens, ex.block_size)
            for b in seq.block_table[keep:]:
                ex.device.decref(b)
            del seq.block_table[keep:]
        self._publish(ex, seq)
        n = len(seq.block_table)
        if n <= ex.cpu.num_free and ex.cost.prefer_swap(n, seq.num_tokens):
            cpu_blocks = ex.cpu.allocate(n)
            cpu_tier.claim(self, ex, cpu_blocks)
            r.add_ops("swap_out", [[g, c] for g, c in zip(seq.block_table, cpu_blocks)])
            for b in seq.block_table:
                ex.device.decref(b)
            seq.cpu_table, seq.block_table, seq.swapped = cpu_blocks, [], True
            ex.counters["swap_out_blocks"] += n
            ex.counters["preemptions_swap"] += 1
            r.preempted[seq.seq_id] = "swap"
            log.info("preempted %s by swap-out (%d blocks)", seq.seq_id, n)
        else:
            self._release(ex, seq)
            del ex.seqs[seq.seq_id]
            ex.counters["preemptions_recompute"] += 1
            r.preempted[seq.seq_id] = "recompute"
            log.info("preempted %s by recompute (%d tokens)", seq.seq_id, seq.num_tokens)

    def _swap_in(self, ex: ExecutorState, seq: Sequence, r: _StepReply) -> None:
        if not seq.swapped:
            raise BlockManagerError(f"sequence {seq.seq_id!r} is not swapped out")
        n = len(seq.cpu_table)
        if ex.device.num_free - n < ex.watermark_blocks:
            r.denied[seq.seq_id] = DENIED_NO_SPACE
            return
        blocks = self._allocate(ex, n, r)
        r.add_ops("swap_in", [[c, g] for c, g in zip(seq.cpu_table, blocks)])
        r.cpu_held.extend(seq.cpu_table)  # freed when the step ends (blockmgr.cpu_tier)
        seq.block_table, seq.cpu_table, seq.swapped = blocks, [], False
        ex.counters["swap_in_blocks"] += n
        r.swapped_in.append(seq.seq_id)
        r.updates[seq.seq_id] = [0, list(blocks)]

    def _admit(self, ex: ExecutorState, seq_id: str, prompt: list[int], num_new: int, salt, priority: int,
               r: _StepReply) -> None:
        if seq_id in ex.seqs:
            raise BlockManagerError(f"sequence {seq_id!r} already exists on executor {ex.executor_id!r}")
        if not prompt or num_new < 1:
            raise BlockManagerError(f"admit {seq_id!r}: empty prompt or num_new_tokens < 1")
        bs = ex.block_size
        if blocks_for(len(prompt), bs) > ex.device.num_blocks:
            r.denied[seq_id] = DENIED_NEVER_FITS
            return
        seq = Sequence(seq_id, cache_salt=salt, priority=priority, arrival=ex.next_arrival)
        ex.next_arrival += 1
        hits, hashes, from_cpu = [], [], []
        if self.enable_prefix_caching:
            # Never the whole prompt: its last token must be computed to get logits.
            hashes = hash_chain(prompt, bs, seq.extra_keys, (len(prompt) - 1) // bs)
            hits = self._lookup(ex, hashes, prompt)
            from_cpu = cpu_tier.continue_chain(ex, hashes, prompt, len(hits))
        num_cached = (len(hits) + len(from_cpu)) * bs
        target = min(len(prompt), num_cached + num_new)
        need = blocks_for(target, bs) - len(hits)
        reviving = sum(1 for b in hits if ex.device.is_free(b))
        if ex.device.num_free - reviving - need < ex.watermark_blocks:
            r.denied[seq_id] = DENIED_NO_SPACE
            return
        for b in hits:
            if ex.device.is_free(b):
                ex.device.take(b)
            else:
                ex.device.incref(b)
            cache_index.record_hit(ex, ex.cached_meta[b][0], priority)
        cpu_tier.hold(ex, from_cpu, r.cpu_held)
        revived = self._allocate(ex, len(from_cpu), r)
        cpu_tier.bring_in(self, ex, from_cpu, revived, r.swap_in)
        for h in hashes[len(hits) : len(hits) + len(from_cpu)]:
            cache_index.record_hit(ex, h, priority)
        seq.block_table = hits + revived + self._allocate(ex, need - len(from_cpu), r)
        seq.tokens = prompt[:target]
        seq.block_hashes = hashes[: len(hits) + len(from_cpu)]
        ex.seqs[seq_id] = seq
        c = ex.counters
        c["prefix_queries_blocks"] += len(hashes)
        c["prefix_hits_blocks"] += len(hits) + len(from_cpu)
        c["prefix_queries_tokens"] += len(prompt)
        c["prefix_hits_tokens"] += num_cached
        r.admitted[seq_id] = num_cached
        r.grown_from[seq_id] = num_cached
        r.updates[seq_id] = [0, list(seq.block_table)]

    def _fork(self, ex: ExecutorState, parent_id: str, child_id: str) -> None:
        parent = self._seq(ex, parent_id)
        if parent.swapped:
            raise BlockManagerError(f"cannot fork {parent_id!r} while it is swapped out")
        if child_id in ex.seqs:
            raise BlockManagerError(f"sequence {child_id!r} already exists on executor {ex.executor_id!r}")
        for b in parent.block_table:
            ex.device.incref(b)
        ex.seqs[child_id] = Sequence(
            child_id, list(parent.block_table), [], list(parent.tokens), list(parent.block_hashes),
            parent.cache_salt, parent.priority, parent.arrival,
        )

    def _free(self, ex: ExecutorState, seq_id: str) -> None:
        seq = ex.seqs.pop(seq_id, None)
        if seq is None:
            return
        if seq.swapped:
            for b in seq.cpu_table:
                ex.cpu.decref(b)
            return
        self._publish(ex, seq)
        self._release(ex, seq)

    @staticmethod
    def _release(ex: ExecutorState, seq: Sequence) -> None:
        # Tail first: the tail blocks are the least likely to be reused, so they reach the front
        # of the LRU free queue (evicted first) ahead of the shared prefix blocks.
        for block in reversed(seq.block_table):
            ex.device.decref(block)
        seq.block_table = []

    # -- prefix cache -------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> dict[str, int]:
        """Tokens of ``token_ids`` each executor holds in its prefix cache, either tier (for routing)."""
        out = {}
        extra = (cache_salt,) if cache_salt is not None else ()
        for ex_id, ex in self.executors.items():
            if not self.enable_prefix_caching:
                out[ex_id] = 0
                continue
            hashes = hash_chain(token_ids, ex.block_size, extra, (len(token_ids) - 1) // ex.block_size)
            hits = len(self._lookup(ex, hashes, token_ids))
            hits += len(cpu_tier.continue_chain(ex, hashes, token_ids, hits))  # cheaper than recompute too
            out[ex_id] = hits * ex.block_size
        return out

    def reset_prefix_cache(self, executor_id: str | None = None) -> dict:
        """Drop every free cached block; blocks in use keep their hashes.

        Returns:
            ``{"reset": bool, "dropped_blocks": n, "blocks_in_use": m, "message": str}``; ``reset``
            is true only when no cached block is left anywhere asked for.
        """
        targets = [self._executor(executor_id)] if executor_id else list(self.executors.values())
        dropped = in_use = 0
        for ex in targets:
            gone = [b for b in ex.cached_meta if ex.device.is_free(b)]
            hashes = list(ex.cpu_cache)
            dropped += len(hashes)
            for h in hashes:
                del ex.cpu_meta[ex.cpu_cache.pop(h)]
                ex.use.pop(h, None)
            for b in gone:
                h = ex.cached_meta.pop(b)[0]
                del ex.cache[h]
                ex.use.pop(h, None)
                hashes.append(h)
            dropped += len(gone)
            in_use += len(ex.cached_meta)
            if not ex.cached_meta and hashes:
                self._emit(["AllBlocksCleared", ex.executor_id])
            elif hashes:
                self._emit(["BlockRemoved", ex.executor_id, hashes])
        self._flush_events()
        if in_use:
            message = (f"dropped {dropped} free cached blocks; {in_use} cached blocks are in use by "
                       f"running sequences or pins and were kept")
        else:
            message = f"dropped {dropped} cached blocks; the prefix cache is empty"
        return {"reset": in_use == 0, "dropped_blocks": dropped, "blocks_in_use": in_use, "message": message}

    # -- events -------------------------------------------------------------------------------
    def _emit(self, event: list) -> None:
        self._events.append(event)

    def _flush_events(self) -> None:
        if self._events and self.on_events is not None:
            self.on_events(self._events)
        self._events = []

    # -- inspection ----------------------------------------------------------------------------
    def stats(self, summary: bool = False) -> dict:
        """Per executor: block counts per tier, usage, utilization, prefix-cache and preemption counters,
        and, with a durable store, its health (``persistence``: see :meth:`blockmgr.persistence.RedisStore.status`).

        ``summary``: leave out ``num_running``, ``num_swapped``, ``token_utilization`` and
        ``device.cached_free``, whose cost grows with the sequences or blocks; the rest costs O(1) per
        executor (what ``/metrics`` asks for).
        """
        out = {}
        for ex_id, ex in self.executors.items():
            dev = ex.device
            c = ex.counters
            out[ex_id] = {
                "block_size": ex.block_size,
                "num_seqs": len(ex.seqs),
                "device": {
                    "total": dev.num_blocks, "free": dev.num_free, "used": dev.num_used,
                    "usage_perc": 100.0 * dev.num_used / dev.num_blocks if dev.num_blocks else 0.0,
                },
                "cpu": {"total": ex.cpu.num_blocks, "free": ex.cpu.num_free, "used": ex.cpu.num_used,
                        "cached_free": len(ex.cpu_meta)},
                "prefix_cache": {
                    "queries_blocks": c["prefix_queries_blocks"], "hits_blocks": c["prefix_hits_blocks"],
                    "queries_tokens": c["prefix_queries_tokens"], "hits_tokens": c["prefix_hits_tokens"],
                    "cached_blocks": len(ex.cache),
                },
                "evictions": c["evictions"],
                "swap_out_blocks": c["swap_out_blocks"],
                "swap_in_blocks": c["swap_in_blocks"],
                "copy_on_write": c["copy_on_write"],
                "cpu_tier": {"out_blocks": c["cpu_tier_out_blocks"], "in_blocks": c["cpu_tier_in_blocks"]},
                "preemptions": {"swap": c["preemptions_swap"], "recompute": c["preemptions_recompute"]},
            }
            if not summary:
                out[ex_id]["num_running"] = sum(1 for s in ex.seqs.values() if not s.swapped)
                out[ex_id]["num_swapped"] = sum(1 for s in ex.seqs.values() if s.swapped)
                fill: dict[int, int] = {}
                for seq in ex.seqs.values():
                    for i, b in enumerate(seq.block_table):
                        filled = min(ex.block_size, seq.num_tokens - i * ex.block_size)
                        fill[b] = max(fill.get(b, 0), filled)
                out[ex_id]["device"]["cached_free"] = sum(1 for b in ex.cached_meta if dev.is_free(b))
                out[ex_id]["token_utilization"] = sum(fill.values()) / (len(fill) * ex.block_size) if fill else 1.0
            if self.persistence is not None:
                out[ex_id]["persistence"] = self.persistence()
        return out

    def sequence(self, executor_id: str, seq_id: str) -> dict:
        """One sequence's block table: each block's id, refcount, tier and hash (None if unhashed).

        Raises:
            BlockManagerError: unknown executor or sequence.
        """
        ex = self._executor(executor_id)
        seq = self._seq(ex, seq_id)
        if seq.swapped:
            blocks = [{"block": b, "refcount": ex.cpu.refcount[b], "tier": "cpu",
                       "hash": seq.block_hashes[i] if i < len(seq.block_hashes) else None}
                      for i, b in enumerate(seq.cpu_table)]
        else:
            blocks = [{"block": b, "refcount": ex.device.refcount[b], "tier": "device",
                       "hash": ex.cached_meta[b][0] if b in ex.cached_meta else None}
                      for b in seq.block_table]
        return {"seq_id": seq_id, "executor_id": executor_id, "num_tokens": seq.num_tokens,
                "state": "swapped" if seq.swapped else "running", "blocks": blocks}

    # -- persistence --------------------------------------------------------------------------
    def snapshot(self, executor_id: str, deferred: bool = False) -> dict[str, Any]:
        """Everything needed to rebuild one executor's state (see ``blockmgr.persistence``).

        A copy that shares no list or dict the manager changes later (the sequences' tables and
        tokens, counters, pins), so another thread may serialize it while steps go on. Token lists
        of prefix-cache entries are shared: they never change once cached. ``last_reply`` is
        copied by msgpack round trip (a reply is replaced each step, not changed, but may hold
        the step's own lists).

        Args:
            deferred: the prefix-cache maps (``cached``, ``cpu_cached``, ``use``: one entry per
                cached block, 10^5 and more on a large pool) as :class:`DeferredRows` over
                one-call shallow copies instead of lists of rows. Building the rows is the costly
                part (hundreds of milliseconds at 256k blocks, most of it the garbage collector's
                passes over the new lists); a background writer builds them slice by slice
                (``blockmgr.persistence.pack_in_slices``) while steps go on.
        """
        ex = self._executor(executor_id)
        cached, cpu_cached, use = (
            (DeferredRows(ex.cached_meta), DeferredRows(ex.cpu_meta), DeferredRows(ex.use)) if deferred else
            ([[b, h, p, t] for b, (h, p, t) in ex.cached_meta.items()],
             [[b, h, p, t] for b, (h, p, t) in ex.cpu_meta.items()],
             [[h, *u] for h, u in ex.use.items()]))
        return {
            "executor_id": ex.executor_id, "block_size": ex.block_size, "watermark_blocks": ex.watermark_blocks,
            "device": ex.device.snapshot(), "cpu": ex.cpu.snapshot(), "cost": dict(ex.cost.__dict__),
            "seqs": [[w[0], list(w[1]), list(w[2]), list(w[3]), list(w[4]), *w[5:]]
                     for w in (s.to_wire() for s in ex.seqs.values())],
            "cached": cached,
            "counters": dict(ex.counters), "last_step_id": ex.last_step_id,
            "last_reply": None if ex.last_reply is None else msgpack.unpackb(
                msgpack.packb(ex.last_reply, use_bin_type=True), raw=False, strict_map_key=False),
            "use": use, "pins": [copy.deepcopy(p) for p in ex.pins.values()],
            "cpu_cached": cpu_cached,
            "incarnation": ex.incarnation, "retired": list(ex.retired), "next_arrival": ex.next_arrival,
            "saved_at": time.time(),
        }

    def restore(self, snap: dict[str, Any]) -> None:
        """Install one executor's state from :meth:`snapshot`."""
        ex = ExecutorState(
            snap["executor_id"], snap["block_size"], BlockPool.restore(snap["device"]),
            BlockPool.restore(snap["cpu"]), snap["watermark_blocks"], CostModel(**snap["cost"]),
            incarnation=snap.get("incarnation"), retired=list(snap.get("retired") or []),
        )
        for w in snap["seqs"]:
            seq = Sequence.from_wire(w)
            ex.seqs[seq.seq_id] = seq
        for b, h, p, t in snap["cached"]:
            ex.cache[h] = b
            ex.cached_meta[b] = (h, p, list(t))
        for b, h, p, t in snap.get("cpu_cached", ()):
            ex.cpu_cache[h] = b
            ex.cpu_meta[b] = (h, p, list(t))
        ex.use = {h: tuple(u) for h, *u in snap.get("use", ())}
        ex.pins = {rec["pin_id"]: rec for rec in snap.get("pins", ())}
        ex.counters.update(snap["counters"])
        ex.last_step_id, ex.last_reply = snap["last_step_id"], snap["last_reply"]
        ex.next_arrival = snap.get("next_arrival", max((s.arrival + 1 for s in ex.seqs.values()), default=0))
        self.executors[ex.executor_id] = self._with_policy(ex)
