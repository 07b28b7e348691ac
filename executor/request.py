"""A generation request as the executor tracks it, and its sampling parameters."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What to generate and how to pick each token.

    Attributes:
        max_tokens: most tokens to generate (>= 0).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep the k most likely tokens; 0 or -1 keeps all.
        seed: per-request RNG seed; the same seed gives the same tokens whatever the batch.
        n: completions to sample from one prompt; they share the prompt's KV blocks.
        use_beam_search, beam_width: deterministic beam search (``executor.beam_search``);
            the sampling fields are then ignored.
        stop_token_ids: extra token ids that end the request (kept in the output).
        ignore_eos: keep going past the model's EOS token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    use_beam_search: bool = False
    beam_width: int = 4
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raises ValueError naming the first out-of-range field."""
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.use_beam_search and self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.use_beam_search and self.n != 1:
            raise ValueError("use_beam_search returns the best beam only; n must be 1")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or positive, got {self.top_k}")

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown sampling parameters: {sorted(unknown)}")
        params = cls(**d)
        params.validate()
        return params


def seed_for_child(seed: int | None, index: int) -> int | None:
    """The seed of completion ``index`` of an n > 1 request seeded with ``seed``.

    Child 0 keeps the request's seed (so n=1 and the first of n agree); the others get a
    SplitMix64-style mix of (seed, index) (Steele et al., "Fast splittable pseudorandom number
    generators", OOPSLA 2014), distinct and independent of the batch. ``None`` stays ``None``.
    """
    if seed is None or index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence's state: its tokens and how many of them have K/V in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    cache_salt: str | None = None
    priority: int = 0
    parent_id: str | None = None  # for the n > 1 children: the request they were forked from
    index: int = 0  # child index among the n completions
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is not yet in the cache (the prompt's rest, or the last sampled token)."""
        return self.num_tokens - self.num_computed_tokens
