"""Continuous batching with chunked prefill under one token budget per step.

Each step shares one budget of ``max_num_batched_tokens`` tokens, in this order:

1. every running decode (one token each);
2. running prefills that are not finished (a chunk of the prompt each, as much as the budget
   leaves);
3. waiting requests, admitted while the budget and ``max_num_seqs`` allow (the last one admitted
   may get only a first chunk of its prompt).

Decodes go first, so a long prompt never holds up the running decodes: it is split into chunks
that take what the decodes leave (chunked prefill with decode-first batching, as in
Sarathi-Serve: Agrawal et al., OSDI 2024). Within each group requests are ordered by
``(priority, arrival)``: a lower ``priority`` value is served first, equal priorities first come,
first served (vLLM's priority scheduling policy). Preempted requests go back to the waiting queue
at their place in that order, which for equal priorities is ahead of everything that arrived
after them. Which running sequences to preempt when KV memory runs out is the block manager's
decision (``blockmgr.preemption.victim_order``: highest ``priority`` value, then latest arrival).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterator

from executor.request import Request, Status


class WaitQueue:
    """Requests waiting for admission, kept sorted by a key (ties: insertion order).

    Supports what the engine and server use of a deque: ``append`` / ``appendleft`` (both insert
    at the request's place by key), ``popleft``, ``remove``, ``len``, ``in``, iteration.
    """

    def __init__(self, key) -> None:
        self._key = key
        self._items: list[Request] = []
        self._keys: list[tuple] = []

    def append(self, req: Request) -> None:
        key = self._key(req)
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._items.insert(i, req)

    appendleft = append

    def popleft(self) -> Request:
        self._keys.pop(0)
        return self._items.pop(0)

    def remove(self, req: Request) -> None:
        i = self._items.index(req)
        del self._items[i], self._keys[i]

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._items))

    def __contains__(self, req: object) -> bool:
        return req in self._items

    def __getitem__(self, i: int) -> Request:
        return self._items[i]


class Scheduler:
    """Decides which requests run in the next step and how many of their tokens to compute.

    Args:
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: most tokens (decodes plus prefill chunks) in one step.

    Raises:
        ValueError: a limit below 1.
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._arrival: dict[str, int] = {}
        self._arrivals = itertools.count()
        self.waiting = WaitQueue(self.order_key)
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()  # preempted by swap-out, resumed before admissions

    def order_key(self, req: Request) -> tuple[int, int]:
        """``(priority, arrival number)``: smaller is served first. A sequence forked from a
        request (n > 1, beams) shares the request's arrival number."""
        rid = req.request_id
        seq = self._arrival.get(rid)
        if seq is None:
            seq = self._arrival.get(req.parent_id) if req.parent_id is not None else None
            if seq is None:
                seq = next(self._arrivals)
            self._arrival[rid] = seq
        return (req.priority, seq)

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule_swap_ins(self) -> list[Request]:
        """Swapped-out requests to bring back this step (they compute from the next step on).

        None while anything waits to be admitted ahead of them would be unfair; swapped requests
        go before new admissions, and only while ``max_num_seqs`` allows.
        """
        out = []
        while self.swapped and len(self.running) + len(out) < self.max_num_seqs:
            out.append(self.swapped.popleft())
        return out

    def swap_in_done(self, req: Request) -> None:
        req.status = Status.RUNNING
        self.running.append(req)

    def swap_in_denied(self, req: Request) -> None:
        self.swapped.appendleft(req)

    def swap_out(self, req: Request) -> None:
        """Preempt by swap-out: the request keeps its computed tokens, its K/V moves to the CPU."""
        self.running.remove(req)
        req.block_table = []
        req.unreported_from = None  # the block manager keeps the ids of what it held
        req.num_preemptions += 1
        req.status = Status.SWAPPED
        self.swapped.append(req)

    def schedule(self) -> list[tuple[Request, int]]:
        """The next step's batch: ``(request, number of its tokens to compute)`` pairs.

        Newly admitted requests move from ``waiting`` to ``running`` here; the engine moves them
        back if the block manager cannot give them blocks.
        """
        budget = self.max_num_batched_tokens
        batch: list[tuple[Request, int]] = []
        running = sorted(self.running, key=self.order_key)
        decodes = [r for r in running if r.num_uncomputed_tokens == 1]
        prefills = [r for r in running if r.num_uncomputed_tokens > 1]
        for req in decodes + prefills:
            if budget == 0:
                break
            n = min(req.num_uncomputed_tokens, budget)
            batch.append((req, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            n = min(req.num_uncomputed_tokens, budget)
            req.status = Status.RUNNING
            self.running.append(req)
            batch.append((req, n))
            budget -= n
        return batch

    def unadmit(self, req: Request) -> None:
        """Return a request admitted this step to the waiting queue (it got no blocks); it goes
        back to its place by ``(priority, arrival)``, where it was."""
        self.running.remove(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def preempt(self, req: Request) -> None:
        """Preempt by recompute: forget the request's cached K/V and queue it again at its place
        by ``(priority, arrival)`` (ahead of every later arrival of the same priority)."""
        self.running.remove(req)
        req.num_computed_tokens = 0
        req.block_table = []
        req.unreported_from = None
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def remove(self, req: Request) -> None:
        """Forget a finished or aborted request."""
        self._arrival.pop(req.request_id, None)
        for queue in (self.running, self.waiting, self.swapped):
            if req in queue:
                queue.remove(req)
                return
