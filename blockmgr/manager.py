"""The block manager's state machine: pools, block tables and their growth, per executor.

Pure Python with no I/O, so the service (``blockmgr.server``) and the in-process client used by
tests share exactly this code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from blockmgr.block_pool import BlockPool, OutOfBlocks

log = logging.getLogger("pagedserve.blockmgr")

DENIED_NO_SPACE = "no_space"  # try again after other sequences free blocks
DENIED_NEVER_FITS = "never_fits"  # larger than the whole pool: refuse the request


class BlockManagerError(Exception):
    """A request the block manager cannot act on (unknown executor, bad arguments)."""


@dataclass
class Sequence:
    seq_id: str
    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0  # token slots the sequence has asked for


@dataclass
class ExecutorState:
    executor_id: str
    block_size: int
    device: BlockPool
    cpu: BlockPool
    watermark_blocks: int = 0
    seqs: dict[str, Sequence] = field(default_factory=dict)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Holds every registered executor's block pools and its sequences' block tables."""

    def __init__(self, watermark: float = 0.01) -> None:
        """Args:
            watermark: fraction of each device pool kept free when admitting new sequences
                (vLLM's default, 1%), so admissions do not force an immediate preemption.
        """
        if not 0 <= watermark < 1:
            raise BlockManagerError(f"watermark must be in [0, 1), got {watermark}")
        self.watermark = watermark
        self.executors: dict[str, ExecutorState] = {}

    # -- registration -------------------------------------------------------------------------
    def register(self, executor_id: str, num_device_blocks: int, block_size: int, num_cpu_blocks: int = 0) -> dict:
        """Register (or re-register) an executor's pools.

        A re-registration with the same geometry keeps its state, so an executor that reconnects
        does not lose its sequences; a different geometry starts over (the executor restarted).

        Raises:
            BlockManagerError: non-positive block size or negative pool sizes.
        """
        if block_size <= 0 or num_device_blocks < 0 or num_cpu_blocks < 0:
            raise BlockManagerError(
                f"invalid pool geometry: block_size={block_size}, device={num_device_blocks}, cpu={num_cpu_blocks}"
            )
        old = self.executors.get(executor_id)
        if (
            old is not None
            and old.block_size == block_size
            and old.device.num_blocks == num_device_blocks
            and old.cpu.num_blocks == num_cpu_blocks
        ):
            log.info("executor %s re-registered; keeping %d sequences", executor_id, len(old.seqs))
            return {"resumed": True, "num_seqs": len(old.seqs)}
        self.executors[executor_id] = ExecutorState(
            executor_id,
            block_size,
            BlockPool(num_device_blocks),
            BlockPool(num_cpu_blocks),
            watermark_blocks=int(self.watermark * num_device_blocks),
        )
        log.info(
            "executor %s registered: %d device blocks, %d cpu blocks, block_size %d",
            executor_id, num_device_blocks, num_cpu_blocks, block_size,
        )
        return {"resumed": False, "num_seqs": 0}

    def _executor(self, executor_id: str) -> ExecutorState:
        try:
            return self.executors[executor_id]
        except KeyError:
            raise BlockManagerError(f"unknown executor {executor_id!r}; register it first") from None

    # -- one scheduler step ---------------------------------------------------------------------
    def step(self, executor_id: str, free: list[str], grow: list[tuple[str, int]]) -> dict:
        """Apply one scheduler step's batched request: frees first, then growth in the given order.

        Args:
            free: sequence ids whose blocks are released (unknown ids are ignored: a sequence
                denied before it got any block was never recorded).
            grow: ``(seq_id, num_tokens)`` pairs: make the sequence's block table hold at least
                ``num_tokens`` token slots; new ids are created. Each pair is all-or-nothing.

        Returns:
            ``{"updates": {seq_id: [start, [block ids]]}, "denied": {seq_id: reason}}``: the
            executor sets ``block_table[start:] = block ids``; reasons are ``"no_space"`` (retry
            later, or preempt) and ``"never_fits"`` (more blocks than the pool has).
        """
        ex = self._executor(executor_id)
        for seq_id in free:
            self._free(ex, seq_id)
        updates: dict[str, list] = {}
        denied: dict[str, str] = {}
        for seq_id, num_tokens in grow:
            if num_tokens < 0:
                raise BlockManagerError(f"negative num_tokens {num_tokens} for {seq_id!r}")
            seq = ex.seqs.get(seq_id)
            have = len(seq.block_table) if seq else 0
            need = blocks_for(num_tokens, ex.block_size) - have
            if need <= 0:
                if seq is not None:
                    seq.num_tokens = max(seq.num_tokens, num_tokens)
                continue
            if blocks_for(num_tokens, ex.block_size) > ex.device.num_blocks:
                denied[seq_id] = DENIED_NEVER_FITS
                continue
            if seq is None and ex.device.num_free - need < ex.watermark_blocks:
                # Admitting it would leave so few free blocks that running sequences could not
                # grow next step and would be preempted right away.
                denied[seq_id] = DENIED_NO_SPACE
                continue
            try:
                new_blocks = ex.device.allocate(need)
            except OutOfBlocks:
                denied[seq_id] = DENIED_NO_SPACE
                continue
            if seq is None:
                seq = ex.seqs[seq_id] = Sequence(seq_id)
            seq.block_table.extend(new_blocks)
            seq.num_tokens = num_tokens
            updates[seq_id] = [have, new_blocks]
        return {"updates": updates, "denied": denied}

    def _free(self, ex: ExecutorState, seq_id: str) -> None:
        seq = ex.seqs.pop(seq_id, None)
        if seq is None:
            return
        # Reverse order: the tail blocks (least likely to be shared) go back to the queue first.
        for block in reversed(seq.block_table):
            ex.device.decref(block)

    # -- inspection ----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Block counts per executor and tier: ``{executor_id: {"device": {...}, "cpu": {...}}}``."""
        out = {}
        for ex_id, ex in self.executors.items():
            out[ex_id] = {
                "block_size": ex.block_size,
                "num_seqs": len(ex.seqs),
                **{
                    tier: {"total": pool.num_blocks, "free": pool.num_free, "used": pool.num_used}
                    for tier, pool in (("device", ex.device), ("cpu", ex.cpu))
                },
            }
        return out

    def sequence(self, executor_id: str, seq_id: str) -> dict:
        """One sequence's block table with each block's refcount.

        Raises:
            BlockManagerError: unknown executor or sequence.
        """
        ex = self._executor(executor_id)
        seq = ex.seqs.get(seq_id)
        if seq is None:
            raise BlockManagerError(f"unknown sequence {seq_id!r} on executor {executor_id!r}")
        return {
            "seq_id": seq_id,
            "num_tokens": seq.num_tokens,
            "blocks": [
                {"block": b, "refcount": ex.device.refcount[b], "tier": "device"} for b in seq.block_table
            ],
        }
