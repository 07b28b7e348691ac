"""Token selection from one step's logits: greedy, temperature, top-k and top-p (nucleus).

Each request samples from its own ``torch.Generator`` when it has a seed, so its tokens do not
depend on which other requests share the batch. Nucleus sampling: Holtzman et al., "The Curious
Case of Neural Text Degeneration", ICLR 2020.
"""

from __future__ import annotations

import torch

from executor.request import Request


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """Pick one token per row.

    Args:
        logits: ``[num_requests, vocab_size]`` float32, row i belongs to ``requests[i]``.
        requests: the requests being sampled, in row order.

    Returns:
        One token id per request.
    """
    tokens = []
    for row, req in zip(logits, requests):
        p = req.params
        if p.temperature == 0:
            tokens.append(int(torch.argmax(row)))
            continue
        row = row.float() / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= p.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens.append(int(torch.multinomial(probs, 1, generator=req.generator)))
    return tokens
