"""Eviction policies of the prefix cache: which free device block an allocation reuses.

A freed block that still holds a cached prefix stays in the pool's free queue until an allocation
takes it. The pool's own queue is least recently freed first (``lru``, the default). The other
policies hand the choice to a :class:`HeapEvictor`, a binary min-heap over the free blocks with
lazy deletion: adding and removing a block and peeking at the next victim are O(log n) amortized
(a removed block's entry stays in the heap until it reaches the top; the heap is rebuilt when
stale entries outnumber live ones, so its size stays O(free blocks)).

- ``lfu``: fewest prefix-cache hits first, ties by least recently freed (as SGLang's ``lfu``);
- ``priority``: blocks whose most important user had the largest ``priority`` value (the least
  important request) first, ties by least recently freed (SGLang's ``priority``).

Under both, a free block that holds no cached prefix is reused before any cached one.
"""

from __future__ import annotations

import heapq
from typing import Callable

POLICIES = ("lru", "lfu", "priority")


class HeapEvictor:
    """Orders a pool's free blocks by ``key(block)`` (taken when the block becomes free), then age.

    Args:
        key: a block's eviction key; smaller keys are evicted first.
    """

    def __init__(self, key: Callable[[int], tuple]):
        self.key = key
        self._heap: list[tuple[tuple, int, int]] = []
        self._live: dict[int, int] = {}  # free block -> tick of its live heap entry
        self._tick = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, block: int) -> bool:
        return block in self._live

    def add(self, block: int) -> None:
        self._tick += 1
        self._live[block] = self._tick
        heapq.heappush(self._heap, (self.key(block), self._tick, block))

    def remove(self, block: int) -> None:
        del self._live[block]
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def peek(self) -> int | None:
        """The next block to evict, or None when no block is free."""
        heap = self._heap
        while heap and self._live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        return heap[0][2] if heap else None


def make_evictor(policy: str, use_of: Callable[[int], list | None]) -> HeapEvictor | None:
    """The evictor of ``policy`` (None for ``lru``: the pool's own queue is the LRU order).

    Args:
        use_of: a free block's ``[hits, last_use, priority]`` when it holds a cached prefix,
            else None (see :mod:`blockmgr.cache_index`).

    Raises:
        ValueError: an unknown policy.
    """
    if policy == "lru":
        return None
    if policy == "lfu":
        def key(block):
            use = use_of(block)
            return (0, 0) if use is None else (1, use[0])
    elif policy == "priority":
        def key(block):
            use = use_of(block)
            return (0, 0) if use is None else (1, -use[2])
    else:
        raise ValueError(f"unknown eviction policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return HeapEvictor(key)
