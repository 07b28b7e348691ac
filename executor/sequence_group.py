"""Sequence groups: requests that run as several sequences sharing KV blocks.

- ``n > 1`` (parallel sampling): completion 0 is the request's own sequence; completions
  ``1..n-1`` are made when it samples its first token, each with its own seed
  (:func:`executor.request.seed_for_child`), and share the prompt's K/V with it through a
  block-manager fork (copy-on-write of the partly filled last block).
- Beam search: :class:`executor.beam_search.BeamSearchGroup` scores the beams; here they are kept
  as sequences: a continuation of a beam that another new beam already continues becomes a fork of
  it, and beams no continuation uses are dropped.

This module decides which sequences a group adds and drops; the engine carries that out (the
scheduler's queues, the block manager's forks and frees).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from executor.beam_search import BeamSearchGroup
from executor.request import Request, Status, seed_for_child


@dataclass
class BeamStep:
    """What one beam-search step asks of the engine.

    Attributes:
        dropped: beams to free (all of them when the search is ``done``).
        forks: ``(source beam, new beam)`` pairs: the new beam shares the source's blocks.
        done: the search is over; ``group.best()`` holds its result.
    """

    dropped: list[Request]
    forks: list[tuple[Request, Request]] = field(default_factory=list)
    done: bool = False


class SequenceGroups:
    """The engine's n > 1 completions and beam searches, by request and by sequence id."""

    def __init__(self) -> None:
        self.children: dict[str, list[Request]] = {}  # request id -> its n completions, 0 first
        self.beam_of: dict[str, BeamSearchGroup] = {}  # beam sequence id -> its search

    # -- n > 1 -----------------------------------------------------------------------------------
    def make_children(self, sampling: list[Request]) -> list[Request]:
        """Completions 1..n-1 of the requests with n > 1 that sample their first token now.

        Each child copies its parent's prompt, salt and priority and gets its own derived seed; the
        caller gives it the parent's block table once it has sampled, and forks it at the block
        manager.
        """
        children = []
        for req in sampling:
            if req.params.n == 1 or req.parent_id is not None or req.request_id in self.children:
                continue
            group = [req]
            for i in range(1, req.params.n):
                params = dataclasses.replace(req.params, seed=seed_for_child(req.params.seed, i))
                child = Request(f"{req.request_id}#{i}", req.prompt_token_ids, params, cache_salt=req.cache_salt,
                                priority=req.priority, parent_id=req.request_id, index=i,
                                num_cached_tokens=req.num_cached_tokens)
                group.append(child)
                children.append(child)
            self.children[req.request_id] = group
        return children

    def parent(self, child: Request) -> Request:
        """Completion 0 of ``child``'s request."""
        return self.children[child.parent_id][0]

    def completions(self, request_id: str) -> list[Request]:
        """The request's n completions, completion 0 first; empty before they exist (or for n == 1)."""
        return self.children.get(request_id, [])

    def completion_finished(self, request_id: str) -> None:
        """Forget the request's completions once every one of them has finished."""
        group = self.children.get(request_id)
        if group is not None and all(c.status is Status.FINISHED for c in group):
            del self.children[request_id]

    # -- beam search -----------------------------------------------------------------------------
    def start_beam_search(self, req: Request, max_len: int, eos_token_ids: set[int]) -> None:
        """Make ``req`` the first beam of a search of ``req.params.beam_width`` beams."""
        self.beam_of[req.request_id] = BeamSearchGroup(
            req.request_id, req.params.beam_width, len(req.prompt_token_ids), max_len, eos_token_ids,
            beams=[req], scores=[0.0])

    def is_beam(self, seq_id: str) -> bool:
        return seq_id in self.beam_of

    def offer(self, beams: list[Request], logits: torch.Tensor) -> list[BeamSearchGroup]:
        """Record each beam's next-token logits (row ``k`` for ``beams[k]``); returns the searches
        whose running beams have all reported, in the order they completed."""
        ready: list[BeamSearchGroup] = []
        for beam, row in zip(beams, logits):
            group = self.beam_of[beam.request_id]
            if group.offer(beam, row) and group not in ready:
                ready.append(group)
        return ready

    def advance(self, group: BeamSearchGroup) -> BeamStep:
        """One step of ``group`` (every running beam has reported): extend, fork and drop beams.

        The continuing beams get their new token here; the engine frees ``dropped`` and forks and
        schedules each new beam of ``forks``.
        """
        continuations, dropped, done = group.advance()
        for beam in dropped:
            self.beam_of.pop(beam.request_id, None)
        if done:
            return BeamStep(dropped, done=True)
        step = BeamStep(dropped)
        taken: set[str] = set()
        new_beams = []
        for src, token in continuations:
            if src.request_id not in taken:
                taken.add(src.request_id)
                new_beams.append((src, token))
                continue
            # Another continuation of an already-continued beam: fork its pre-token state.
            child = Request(group.new_seq_id(), src.prompt_token_ids, src.params,
                            output_token_ids=list(src.output_token_ids),
                            num_computed_tokens=src.num_computed_tokens, block_table=list(src.block_table),
                            status=Status.RUNNING, cache_salt=src.cache_salt, priority=src.priority,
                            parent_id=group.request_id, num_cached_tokens=src.num_cached_tokens)
            self.beam_of[child.request_id] = group
            step.forks.append((src, child))
            new_beams.append((child, token))
        for beam, token in new_beams:
            beam.output_token_ids.append(token)
        group.beams = [b for b, _ in new_beams]
        return step

    # -- both ------------------------------------------------------------------------------------
    def remove(self, request_id: str) -> list[Request]:
        """Forget the request's completions and running beams; returns them (to abort)."""
        members = list(self.children.pop(request_id, []))
        search = next((g for g in self.beam_of.values() if g.request_id == request_id), None)
        if search is not None:
            members += search.beams
            for beam in search.beams:
                self.beam_of.pop(beam.request_id, None)
        return members
