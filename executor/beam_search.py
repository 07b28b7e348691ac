"""Beam search over paged sequences: beams share their common history through block-manager forks.

The scoring follows HF transformers' beam search (``GenerationMixin._beam_search``, v5) so that
the best sequence is the same for the same model:

- each step, every running beam's next-token log-softmax (fp32) is added to the beam's cumulative
  log-probability, and the ``2 * width`` best (beam, token) candidates over all beams are kept;
- a candidate ending in EOS, or reaching the length limit, is a finished hypothesis if it is among
  the first ``width`` candidates; its score is ``sum_logprobs / generated_len ** length_penalty``;
  the best ``width`` finished hypotheses are kept;
- the ``width`` best unfinished candidates are the next running beams;
- with ``early_stopping=False`` the search stops once the best running beam, scored at its current
  length, cannot beat the worst of ``width`` finished hypotheses (HF's heuristic), or when every
  candidate has finished (the length limit).

Differences from HF: ties between equal scores may be broken differently (HF runs ``topk`` over a
fixed ``width x vocab`` matrix); we return the best hypothesis only (``num_return_sequences=1``);
``length_penalty`` is fixed at 1.0 and ``early_stopping`` at False (HF's defaults).

A new beam that continues a beam already taken by another new beam is a fork of that sequence:
the block manager shares every block and copies only the partly filled last block on write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from executor.request import Request

LENGTH_PENALTY = 1.0


@dataclass
class BeamSearchGroup:
    """The beams of one beam-search request.

    Attributes:
        request_id: the request's id (its first beam's sequence id too).
        width: beam width (HF's ``num_beams``).
        prompt_len: prompt tokens.
        max_len: prompt + max_tokens, capped by the model's context length.
        beams: running beams, best first; ``scores`` holds their cumulative log-probabilities.
        finished: ``(score, generated token ids)``, best first, at most ``width``.
    """

    request_id: str
    width: int
    prompt_len: int
    max_len: int
    eos_token_ids: set[int]
    beams: list[Request] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    finished: list[tuple[float, list[int]]] = field(default_factory=list)
    improvable: bool = True
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # seq id -> next-token log-probs
    _next_id: int = 1

    def offer(self, beam: Request, logits: torch.Tensor) -> bool:
        """Record one beam's next-token logits; True when every running beam has reported."""
        self.pending[beam.request_id] = torch.log_softmax(logits.float(), dim=-1)
        return all(b.request_id in self.pending for b in self.beams)

    def new_seq_id(self) -> str:
        seq_id = f"{self.request_id}~{self._next_id}"
        self._next_id += 1
        return seq_id

    def advance(self) -> tuple[list[tuple[Request, int]], list[Request], bool]:
        """One beam-search step over the reported log-probs.

        Returns:
            ``(continuations, dropped, done)``: ``continuations`` pairs each next running beam's
            source beam with its new token, best first (a source may appear several times: the
            engine forks it); ``dropped`` are beams no continuation uses; ``done`` ends the search.
        """
        cur_len = self.beams[0].num_tokens
        acc = torch.stack([self.pending[b.request_id] + s for b, s in zip(self.beams, self.scores)])
        self.pending.clear()
        vocab = acc.shape[1]
        k = min(2 * self.width, acc.numel())
        top_scores, top_idx = torch.topk(acc.flatten(), k)
        candidates = [(float(sc), int(i) // vocab, int(i) % vocab) for sc, i in zip(top_scores, top_idx)]
        at_limit = cur_len + 1 >= self.max_len
        hits = [at_limit or tok in self.eos_token_ids for _, _, tok in candidates]

        if self.improvable:
            gen_len = cur_len + 1 - self.prompt_len
            for rank, ((score, b, tok), hit) in enumerate(zip(candidates, hits)):
                if hit and rank < self.width:
                    tokens = self.beams[b].output_token_ids + [tok]
                    self.finished.append((score / gen_len**LENGTH_PENALTY, tokens))
            self.finished.sort(key=lambda f: -f[0])
            del self.finished[self.width :]

        running = [(score, b, tok) for (score, b, tok), hit in zip(candidates, hits) if not hit][: self.width]
        if self.improvable and len(self.finished) == self.width and running:
            best_possible = running[0][0] / (cur_len + 1 - self.prompt_len) ** LENGTH_PENALTY
            self.improvable = best_possible > self.finished[-1][0]
        done = not self.improvable or all(hits) or not running
        if done:
            return [], list(self.beams), True
        used = {b for _, b, _ in running}
        dropped = [beam for i, beam in enumerate(self.beams) if i not in used]
        self.scores = [score for score, _, _ in running]
        return [(self.beams[b], tok) for _, b, tok in running], dropped, False

    def best(self) -> list[int]:
        """The generated tokens of the best finished hypothesis."""
        return self.finished[0][1] if self.finished else []
