"""A generation request as the executor tracks it, and its sampling parameters."""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass, field

import torch

#: Most alternatives ``logprobs`` / ``prompt_logprobs`` may ask for (vLLM's and OpenAI's limit).
MAX_LOGPROBS = 20
#: Most ``logit_bias`` entries per request.
MAX_LOGIT_BIAS = 1024


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
        min_p: drop tokens whose probability is below ``min_p`` times the most likely token's, in
            [0, 1]; 0 disables.
        presence_penalty, frequency_penalty: OpenAI's, in [-2, 2]: each generated token's logit
            is lowered by ``frequency_penalty * count + presence_penalty * (count > 0)``.
        repetition_penalty: > 0, 1 disables; HF / CTRL semantics over the prompt and the output
            (a seen token's logit is divided by it when positive, multiplied when negative).
        min_tokens: generate at least this many tokens (<= max_tokens): EOS and ``stop_token_ids``
            are suppressed until then.
        logprobs: None, or how many most likely alternatives (0 to :data:`MAX_LOGPROBS`) to
            return with each generated token's log-probability.
        prompt_logprobs: None, or the same for every prompt token (the first has none).
        logit_bias: ``[[token_id, bias], ...]`` with bias in [-100, 100] (OpenAI's ``logit_bias``):
            added to those tokens' logits before selection, greedy included; at most
            :data:`MAX_LOGIT_BIAS` entries.

    :mod:`executor.sampler` documents the order in which these apply and which distribution the
    log-probabilities come from (the model's raw one).
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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: list = field(default_factory=list)

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
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or in [0, {MAX_LOGPROBS}], got {value}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be integers")
        if not isinstance(self.logit_bias, list) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must be a list of at most {MAX_LOGIT_BIAS} [token_id, bias] pairs")
        for pair in self.logit_bias:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], int)
                    and not isinstance(pair[0], bool) and pair[0] >= 0 and isinstance(pair[1], (int, float))
                    and not isinstance(pair[1], bool) and -100 <= pair[1] <= 100):
                raise ValueError(f"logit_bias entries must be [token_id >= 0, bias in [-100, 100]], got {pair!r}")

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
    #: Prompt log-probability entries computed so far (``[None, entry, ...]``, one per prompt token
    #: up to the last computed position), when ``params.prompt_logprobs`` is set.
    prompt_logprobs: list | None = None
    #: True once an output has carried ``prompt_logprobs``.
    prompt_logprobs_sent: bool = False
    #: Draws the seeded generator still owes the tokens in ``output_token_ids`` at creation (a
    #: request resumed from another executor), taken before its next sample so it continues
    #: exactly as if it had sampled them here.
    owed_draws: int = 0
    #: The first position whose token id the block manager has only as pending (sent before it
    #: was sampled: ``executor.engine.Engine._send_ahead``); None when it has every granted id.
    unreported_from: int | None = None
    _prompt_mask: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """The request wants prompt log-probabilities, so every prompt position must be computed
        here (a prefix-cache hit would skip positions)."""
        return self.params.prompt_logprobs is not None

    def prompt_token_mask(self, vocab_size: int) -> torch.Tensor:
        """``[vocab_size]`` bool, True for the token ids in the prompt (cached; for penalties)."""
        mask = self._prompt_mask
        if mask is None or mask.shape[0] != vocab_size:
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[torch.tensor(self.prompt_token_ids, dtype=torch.int64)] = True
            self._prompt_mask = mask
        return mask

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

    def ends_by_length_after(self, k: int, max_model_len: int) -> bool:
        """Whether the request ends by length (``max_tokens`` or the context length) once ``k`` more
        tokens are sampled."""
        return len(self.output_token_ids) + k >= self.params.max_tokens or self.num_tokens + k >= max_model_len

    def stop_reason(self, token: int, eos_token_ids: Collection[int], max_model_len: int) -> str | None:
        """Why the request ends with ``token``, its newest output token: ``"stop"`` (EOS or a stop
        token), ``"length"`` (``max_tokens`` or the context length reached) or None (it goes on)."""
        p = self.params
        # EOS and stop_token_ids end a request only past min_tokens (the sampler suppresses them
        # until then; this keeps a stop token that slipped through from ending it early).
        if len(self.output_token_ids) > p.min_tokens:
            if not p.ignore_eos and token in eos_token_ids:
                return "stop"
            if token in p.stop_token_ids:
                return "stop"
        if self.ends_by_length_after(0, max_model_len):
            return "length"
        return None


def build_request(request_id: str, prompt_token_ids: list[int], params: SamplingParams, vocab_size: int,
                  max_model_len: int, *, cache_salt: str | None = None, priority: int = 0,
                  output_token_ids: list[int] | None = None) -> Request:
    """A new :class:`Request` after checking it can run on a model of ``vocab_size`` tokens and
    ``max_model_len`` positions (the arguments are those of ``executor.engine.Engine.add_request``).

    A request with ``output_token_ids`` resumes by recompute from another executor: those tokens
    count towards its limits, and a seeded generator owes their draws (``owed_draws``).

    Raises:
        ValueError: empty prompt, token ids outside the vocabulary, invalid ``params``, prompt +
            max_tokens beyond ``max_model_len``, or a resumed request that is done already or has
            ``n > 1`` / beam search.
    """
    if not prompt_token_ids:
        raise ValueError("the prompt is empty")
    vocab = vocab_size
    if any(not (0 <= t < vocab) for t in prompt_token_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    params.validate()
    if any(t >= vocab for t, _ in params.logit_bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
    if params.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 to generate, got {params.max_tokens}")
    total = len(prompt_token_ids) + params.max_tokens
    if total > max_model_len:
        raise ValueError(
            f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
            f"exceeds the model's context length {max_model_len}"
        )
    req = Request(request_id, list(prompt_token_ids), params, cache_salt=cache_salt, priority=priority)
    if output_token_ids:
        if params.n != 1 or params.use_beam_search:
            raise ValueError("only n=1 requests without beam search can resume from output_token_ids")
        if any(not (0 <= t < vocab) for t in output_token_ids):
            raise ValueError(f"output token ids must be in [0, {vocab})")
        if len(output_token_ids) >= params.max_tokens:
            raise ValueError(f"the request already has {len(output_token_ids)} of its {params.max_tokens} tokens")
        req.output_token_ids = list(output_token_ids)
        req.owed_draws = len(output_token_ids) if params.temperature != 0 else 0
    return req
