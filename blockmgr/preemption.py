"""Preemption policy: which sequences to preempt, and whether to swap each one or recompute it.

Victims: lowest priority first (largest ``priority`` value), then latest arrival, as in vLLM's
scheduler.

Swap or recompute (the trade-off of the PagedAttention paper, Kwon et al. SOSP 2023, section 4.5):

- swap costs moving the sequence's blocks out and back in:
  ``t_swap = 2 * num_blocks * bytes_per_block / copy_bandwidth``;
- recompute costs one prefill of the sequence's tokens:
  ``t_recompute = num_tokens * flops_per_token / flops_per_s`` with ``flops_per_token ~= 2 *
  num_params`` (Kaplan et al. 2020, the forward-pass estimate).

The executor measures ``copy_bandwidth`` (device <-> CPU bytes/s) and ``flops_per_s`` at start-up
and reports them when it registers. Swap is chosen when it is cheaper and the CPU pool has room.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CostModel:
    """Measured figures of one executor (all positive; zeros disable swapping)."""

    bytes_per_block: int = 0
    copy_bandwidth: float = 0.0  # bytes/s, device <-> CPU
    flops_per_token: float = 0.0  # forward-pass FLOPs per token
    flops_per_s: float = 0.0

    def swap_seconds(self, num_blocks: int) -> float:
        if self.copy_bandwidth <= 0:
            return float("inf")
        return 2 * num_blocks * self.bytes_per_block / self.copy_bandwidth

    def recompute_seconds(self, num_tokens: int) -> float:
        if self.flops_per_s <= 0:
            return 0.0
        return num_tokens * self.flops_per_token / self.flops_per_s

    def prefer_swap(self, num_blocks: int, num_tokens: int) -> bool:
        return self.swap_seconds(num_blocks) < self.recompute_seconds(num_tokens)

    def prefer_swap_in(self, num_blocks: int, num_tokens: int) -> bool:
        """Copying blocks already on the CPU back in (one way) beats recomputing their tokens."""
        return self.swap_seconds(num_blocks) / 2 < self.recompute_seconds(num_tokens)


def victim_order(seqs):
    """Sequences in the order they should be preempted (first = preempt first)."""
    return sorted(seqs, key=lambda s: (-s.priority, -s.arrival))
