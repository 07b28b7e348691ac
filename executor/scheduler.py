"""Continuous batching with chunked prefill under one token budget per step.

Each step, running sequences go first (a decode costs one token, an unfinished prefill a chunk of
its prompt), then waiting requests are admitted first come, first served while the token budget
(``max_num_batched_tokens``) and ``max_num_seqs`` allow. A long prompt is split into chunks, so it
never holds up the running decodes for more than one step (chunked prefill, as in Sarathi-Serve:
Agrawal et al., OSDI 2024).
"""

from __future__ import annotations

from collections import deque

from executor.request import Request, Status


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
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()  # preempted by swap-out, resumed before admissions

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
        for req in self.running:
            if budget == 0:
                break
            n = min(req.num_uncomputed_tokens, budget)
            if n > 0:
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
        """Return a request admitted this step to the front of the queue (it got no blocks)."""
        self.running.remove(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def preempt(self, req: Request) -> None:
        """Preempt by recompute: forget the request's cached K/V and queue it first."""
        self.running.remove(req)
        req.num_computed_tokens = 0
        req.block_table = []
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def remove(self, req: Request) -> None:
        for queue in (self.running, self.waiting, self.swapped):
            if req in queue:
                queue.remove(req)
                return
