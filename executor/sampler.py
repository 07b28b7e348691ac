"""Token selection from one step's logits, and the log-probabilities requests ask for.

Per row (the raw fp32 logits of one sequence's next token), in this order:

1. **Log-probabilities**: ``log_softmax`` of the raw logits, before penalties, temperature or any
   filtering (vLLM's default ``logprobs_mode="raw_logprobs"``). A request with ``logprobs = k``
   gets the sampled token's value and the ``k`` most likely tokens'; prompt log-probabilities
   (:func:`prompt_logprob_entries`) come from the same raw distribution.
2. **Penalties**, each only where the request sets it:

   - ``repetition_penalty`` ``r`` over every token id in the prompt or the output so far
     (Keskar et al., "CTRL", 2019; HF's ``RepetitionPenaltyLogitsProcessor``): a logit ``l``
     becomes ``l / r`` if ``l > 0`` else ``l * r``;
   - ``frequency_penalty`` and ``presence_penalty`` over the generated tokens only (OpenAI's
     definition): ``l -= frequency_penalty * count + presence_penalty * (count > 0)``.

   Then ``logit_bias`` (OpenAI's): each listed token's bias is added to its logit.
3. **min_tokens**: while the output is shorter than ``min_tokens``, EOS (unless ``ignore_eos``)
   and ``stop_token_ids`` get ``-inf``.
4. **Selection**: a temperature below :data:`GREEDY_BELOW` (0 included) takes the argmax (the
   lowest id among equal maxima, ``torch.max``'s answer, computed by
   :func:`kernels.argmax_cpu.argmax_rows`): dividing by a tinier one overflows the logits to inf
   and the softmax to NaN.
   Otherwise the logits are divided by the temperature and filtered in HF's warper order:
   ``top_k`` (keep the k largest), ``top_p`` (keep the smallest set of most likely tokens whose
   probability mass reaches top_p; the most likely token always stays; Holtzman et al., ICLR
   2020), ``min_p`` (drop tokens less likely than ``min_p`` times the most likely one); then one
   token is drawn from the softmax of what is left.
5. **Drawing** is an exponential race: ``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)`` independent
   picks token ``i`` with probability ``p_i`` (the Gumbel-max trick written with exponentials, as
   vLLM samples). A seeded request draws its ``E`` from its own ``torch.Generator``, one
   vocabulary-sized draw per sampled token, so its tokens depend only on its seed and its own
   logits, never on the rest of the batch; unseeded rows draw from torch's global generator.

Everything is batched over rows where that is cheap (penalties, filtering, softmax, the race); the
per-row Python work is building the token-count inputs and one generator call per seeded row.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from executor.request import Request
from kernels.argmax_cpu import argmax_rows

#: Rows of prompt positions whose logits are computed at once for prompt log-probabilities.
PROMPT_LOGPROB_ROWS = 256
#: Temperatures below this select greedily (vLLM's ``_SAMPLING_EPS``).
GREEDY_BELOW = 1e-5


@dataclass
class SamplerOutput:
    """One step's picks.

    Attributes:
        token_ids: one token per row.
        logprobs: per row, ``{"token_id", "logprob", "top": [[token_id, logprob], ...]}`` (``top``
            holds the ``params.logprobs`` most likely tokens, best first) or None when the request
            did not ask for log-probabilities.
    """

    token_ids: list[int]
    logprobs: list[dict | None]


def logprob_entry(logprobs_row: torch.Tensor, token_id: int, num_top: int) -> dict:
    """``{"token_id", "logprob", "top"}`` for ``token_id`` from one row of log-probabilities."""
    entry = {"token_id": int(token_id), "logprob": float(logprobs_row[token_id]), "top": []}
    if num_top > 0:
        values, ids = torch.topk(logprobs_row, num_top)
        entry["top"] = [[int(i), float(v)] for i, v in zip(ids.tolist(), values.tolist())]
    return entry


def sample(logits: torch.Tensor, requests: list[Request], eos_token_ids: Collection[int] = ()) -> list[int]:
    """Pick one token per row; :func:`sample_with_logprobs` without the log-probabilities."""
    return sample_with_logprobs(logits, requests, eos_token_ids).token_ids


def sample_with_logprobs(
    logits: torch.Tensor, requests: list[Request], eos_token_ids: Collection[int] = ()
) -> SamplerOutput:
    """Pick one token per row and report the log-probabilities the requests asked for.

    Args:
        logits: ``[num_rows, vocab_size]`` raw next-token logits (any float dtype; used in fp32,
            not modified). Row ``i`` belongs to ``requests[i]``.
        requests: the sequences being sampled, in row order; their ``params``, output so far
            (penalties, ``min_tokens``) and ``generator`` (seeded requests) are read, and a seeded
            request's generator advances.
        eos_token_ids: the model's EOS ids (suppressed by ``min_tokens`` unless ``ignore_eos``).

    Returns:
        :class:`SamplerOutput`.

    Raises:
        ValueError: ``logits`` is not 2-D with one row per request.
    """
    if logits.dim() != 2 or logits.shape[0] != len(requests):
        raise ValueError(f"expected logits [{len(requests)}, vocab], got {tuple(logits.shape)}")
    num_rows = len(requests)
    entries: list[dict | None] = [None] * num_rows
    want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    adjusted = any(_penalized(r.params) or r.params.logit_bias or len(r.output_token_ids) < r.params.min_tokens
                   for r in requests)
    greedy = [i for i, r in enumerate(requests) if r.params.temperature < GREEDY_BELOW]
    # Widening bf16 logits to fp32 is exact and keeps their order, so a batch that only takes each
    # row's first maximum reads the logits as they come, without writing and reading an fp32 copy
    # (for 64 x 49,152 bf16 logits the copy took 1.2 ms; the argmax reads bf16 in 0.27 ms).
    raw = logits if not want and not adjusted and len(greedy) == num_rows else logits.float()
    if want:
        raw_logprobs = torch.log_softmax(raw if len(want) == num_rows else raw[want], dim=-1)

    work = raw
    if adjusted:
        work = raw.clone()
        _apply_penalties(work, requests)
        _apply_logit_bias(work, requests)
        _apply_min_tokens(work, requests, eos_token_ids)
    if len(greedy) == num_rows:
        token_list = argmax_rows(work)
    else:
        tokens = torch.empty(num_rows, dtype=torch.int64)
        rand = [i for i, r in enumerate(requests) if r.params.temperature >= GREEDY_BELOW]
        if greedy:
            tokens[greedy] = torch.tensor(argmax_rows(work[greedy]), dtype=torch.int64)
        # _sample_random works in place: on a copy unless ``work`` is already one.
        sub = work[rand] if (greedy or work is raw) else work
        tokens[rand] = _sample_random(sub, [requests[i] for i in rand])
        token_list = tokens.tolist()
    for k, i in enumerate(want):
        entries[i] = logprob_entry(raw_logprobs[k], token_list[i], requests[i].params.logprobs)
    return SamplerOutput(token_list, entries)


def takes_raw_argmax(request: Request) -> bool:
    """Whether :func:`sample_with_logprobs` picks this request's next token as the argmax of its raw
    logits and reports nothing else: greedy, no log-probabilities, no penalty, ``logit_bias`` or
    pending ``min_tokens``. Then only the argmax is needed, not the logits
    (:meth:`executor.model_runner.ModelRunner.greedy_tokens`)."""
    p = request.params
    return (p.temperature < GREEDY_BELOW and p.logprobs is None and not _penalized(p) and not p.logit_bias
            and len(request.output_token_ids) >= p.min_tokens)


def _penalized(p) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """Repetition, frequency and presence penalties, in place, on the rows that set any."""
    rows = [i for i, r in enumerate(requests) if _penalized(r.params)]
    if not rows:
        return
    vocab = logits.shape[1]
    reqs = [requests[i] for i in rows]
    # Output token counts [rows, vocab], from ids padded with an extra "vocab" column.
    longest = max(len(r.output_token_ids) for r in reqs)
    ids = torch.full((len(rows), max(longest, 1)), vocab, dtype=torch.int64)
    for k, r in enumerate(reqs):
        if r.output_token_ids:
            ids[k, : len(r.output_token_ids)] = torch.tensor(r.output_token_ids, dtype=torch.int64)
    counts = torch.zeros((len(rows), vocab + 1), dtype=logits.dtype)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    sub = logits[rows]
    rep = torch.tensor([r.params.repetition_penalty for r in reqs], dtype=logits.dtype).unsqueeze(1)
    if bool((rep != 1.0).any()):
        seen = torch.stack([r.prompt_token_mask(vocab) for r in reqs]) | (counts > 0)
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)
    freq = torch.tensor([r.params.frequency_penalty for r in reqs], dtype=logits.dtype).unsqueeze(1)
    pres = torch.tensor([r.params.presence_penalty for r in reqs], dtype=logits.dtype).unsqueeze(1)
    sub = sub - freq * counts - pres * (counts > 0).to(logits.dtype)
    logits[rows] = sub


def _apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> None:
    """Add each row's ``logit_bias`` to its logits, in place (row by row: batch invariant)."""
    for i, r in enumerate(requests):
        if r.params.logit_bias:
            ids = torch.tensor([t for t, _ in r.params.logit_bias], dtype=torch.int64)
            bias = torch.tensor([b for _, b in r.params.logit_bias], dtype=logits.dtype)
            logits[i].index_add_(0, ids, bias)


def _apply_min_tokens(logits: torch.Tensor, requests: list[Request], eos_token_ids: Collection[int]) -> None:
    for i, r in enumerate(requests):
        p = r.params
        if len(r.output_token_ids) >= p.min_tokens:
            continue
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        stops = [t for t in stops if 0 <= t < logits.shape[1]]
        if stops:
            logits[i, stops] = float("-inf")


def _sample_random(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then the exponential race; ``logits`` is modified."""
    num_rows, vocab = logits.shape
    params = [r.params for r in requests]
    logits.div_(torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1))
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    filtered = [i for i, p in enumerate(params) if top_k[i] < vocab or p.top_p < 1.0 or p.min_p > 0.0]
    if filtered:
        sub = logits[filtered]
        ordered, order = sub.sort(dim=-1, descending=True, stable=True)
        ranks = torch.arange(vocab).unsqueeze(0)
        drop = ranks >= torch.tensor([top_k[i] for i in filtered]).unsqueeze(1)
        ordered = ordered.masked_fill(drop, float("-inf"))
        top_p = torch.tensor([params[i].top_p if params[i].top_p < 1.0 else float("inf") for i in filtered],
                             dtype=logits.dtype).unsqueeze(1)
        probs = torch.softmax(ordered, dim=-1)
        # Mass of the strictly more likely tokens: a token stays while that is below top_p.
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        min_p = torch.tensor([params[i].min_p for i in filtered], dtype=logits.dtype).unsqueeze(1)
        probs = torch.softmax(ordered, dim=-1)
        drop |= probs < min_p * probs[:, :1]
        logits[filtered] = sub.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(requests) if r.generator is None]
    for i, r in enumerate(requests):
        if r.generator is not None:
            for _ in range(r.owed_draws):  # a resumed request: the draws of its earlier tokens
                race[i].exponential_(generator=r.generator)
            r.owed_draws = 0
            race[i].exponential_(generator=r.generator)
    if unseeded:
        race[unseeded] = torch.empty((len(unseeded), vocab), dtype=probs.dtype).exponential_()
    race.clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)


def prompt_logprob_entries(
    logprobs_rows: torch.Tensor, next_token_ids: list[int], num_top: int
) -> list[dict]:
    """Prompt log-probability entries from the raw log-softmax at consecutive prompt positions.

    Args:
        logprobs_rows: ``[n, vocab_size]`` fp32 log-probabilities at positions ``p .. p + n - 1``.
        next_token_ids: the prompt tokens at positions ``p + 1 .. p + n`` (what each row predicts).
        num_top: how many most likely alternatives to list per entry.

    Returns:
        ``n`` entries ``{"token_id", "logprob", "top"}``.
    """
    ids = torch.tensor(next_token_ids, dtype=torch.int64)
    chosen = logprobs_rows.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
    if num_top > 0:
        values, top_ids = torch.topk(logprobs_rows, num_top, dim=-1)
        tops = [[[int(t), float(v)] for t, v in zip(ti, vi)] for ti, vi in zip(top_ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in next_token_ids]
    return [{"token_id": int(t), "logprob": float(lp), "top": top} for t, lp, top in zip(next_token_ids, chosen, tops)]
