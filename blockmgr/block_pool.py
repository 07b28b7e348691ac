"""One pool of physical KV blocks: reference counts and an O(1) free queue.

The free queue is a doubly linked list threaded through two arrays (``prev``/``next``), so a
block can leave it from any position in O(1) (needed once freed blocks stay cached for prefix
reuse and can be revived from the middle of the queue). Allocation takes from the front; a freed
block goes to the back, so the least recently freed block is reused first (LRU).
"""

from __future__ import annotations

_NIL = -1


class OutOfBlocks(Exception):
    """Raised when a pool has fewer free blocks than requested."""


class BlockPool:
    """Reference-counted blocks ``0 .. num_blocks-1`` of one tier (device or CPU) of one executor.

    Args:
        num_blocks: number of physical blocks in the pool (>= 0).

    Raises:
        ValueError: negative ``num_blocks``.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        # Free queue: head/tail sentinels are the index num_blocks (one shared sentinel node).
        self._sentinel = num_blocks
        self._prev = [_NIL] * (num_blocks + 1)
        self._next = [_NIL] * (num_blocks + 1)
        self._prev[self._sentinel] = self._next[self._sentinel] = self._sentinel
        self._in_queue = [False] * num_blocks
        self.num_free = 0
        self.evictor = None
        for block in range(num_blocks):
            self._push_back(block)

    def use_evictor(self, evictor) -> None:
        """Let ``evictor`` (``blockmgr.eviction``) choose which free block an allocation takes."""
        self.evictor = evictor
        if evictor is not None:
            for block in self.free_blocks_lru():
                evictor.add(block)

    # -- free queue -------------------------------------------------------------------------
    def _push_back(self, block: int) -> None:
        tail = self._prev[self._sentinel]
        self._next[tail] = block
        self._prev[block] = tail
        self._next[block] = self._sentinel
        self._prev[self._sentinel] = block
        self._in_queue[block] = True
        self.num_free += 1
        if self.evictor is not None:
            self.evictor.add(block)

    def _unlink(self, block: int) -> None:
        p, n = self._prev[block], self._next[block]
        self._next[p] = n
        self._prev[n] = p
        self._prev[block] = self._next[block] = _NIL
        self._in_queue[block] = False
        self.num_free -= 1
        if self.evictor is not None:
            self.evictor.remove(block)

    def free_blocks_lru(self):
        """Free block ids from least to most recently freed (a generator; for inspection)."""
        block = self._next[self._sentinel]
        while block != self._sentinel:
            yield block
            block = self._next[block]

    def peek_free(self) -> int | None:
        """The block the next allocation would take, without taking it."""
        if self.evictor is not None:
            return self.evictor.peek()
        head = self._next[self._sentinel]
        return None if head == self._sentinel else head

    # -- allocation -------------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def is_free(self, block: int) -> bool:
        return self._in_queue[block]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the front of the free queue, each with refcount 1.

        Raises:
            OutOfBlocks: fewer than ``n`` free blocks (nothing is taken).
        """
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free} free of {self.num_blocks}")
        blocks = []
        for _ in range(n):
            block = self.peek_free()
            self._unlink(block)
            self.refcount[block] = 1
            blocks.append(block)
        return blocks

    def take(self, block: int) -> None:
        """Take one specific free block (refcount 0 -> 1), e.g. a cached block revived by a hit."""
        if not self._in_queue[block]:
            raise ValueError(f"block {block} is not free")
        self._unlink(block)
        self.refcount[block] = 1

    def incref(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} is free; take() it instead of incref()")
        self.refcount[block] += 1

    def decref(self, block: int) -> bool:
        """Drop one reference; the last one returns the block to the back of the free queue.

        Returns:
            True when the block became free.

        Raises:
            ValueError: the block is already free (a double free).
        """
        if self.refcount[block] <= 0:
            raise ValueError(f"double free of block {block}")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._push_back(block)
            return True
        return False

    # -- persistence --------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Refcounts and the free queue's order (enough to rebuild the pool exactly)."""
        return {"num_blocks": self.num_blocks, "refcount": list(self.refcount), "free": list(self.free_blocks_lru())}

    @classmethod
    def restore(cls, snap: dict) -> "BlockPool":
        """Rebuild a pool from :meth:`snapshot`.

        Raises:
            ValueError: the snapshot is inconsistent (a block both free and referenced).
        """
        pool = cls(0)
        n = snap["num_blocks"]
        pool.num_blocks = n
        pool.refcount = list(snap["refcount"])
        pool._sentinel = n
        pool._prev = [_NIL] * (n + 1)
        pool._next = [_NIL] * (n + 1)
        pool._prev[n] = pool._next[n] = n
        pool._in_queue = [False] * n
        pool.num_free = 0
        for block in snap["free"]:
            if pool.refcount[block] != 0:
                raise ValueError(f"snapshot lists block {block} as free with refcount {pool.refcount[block]}")
            pool._push_back(block)
        if pool.num_free != sum(1 for r in pool.refcount if r == 0):
            raise ValueError("snapshot's free queue does not hold every unreferenced block")
        return pool
