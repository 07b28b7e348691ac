"""Paged attention for one model layer: write the step's K/V into the cache, then attend.

The CPU path uses the plain-torch twins in ``kernels.torch_ref``; the CUDA path uses the Triton
kernels. Both read every key/value from the paged cache, so prefill, chunked prefill, prefix-cache
hits and decode share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import kernels
from kernels.torch_ref import ExtendAttentionPlan


@dataclass
class AttentionMetadata:
    """Per-step batch layout shared by every layer.

    Attributes:
        slot_mapping: ``[num_tokens]`` int64, cache slot of each new token (``block * block_size + offset``).
        block_table: ``[num_seqs, max_blocks_per_seq]`` int32 physical block ids (padded with 0).
        seq_lens: ``[num_seqs]`` int32 context length of each sequence after this step's tokens.
        query_start_loc: ``[num_seqs + 1]`` int32 cumulative count of new tokens per sequence.
        max_query_len: the longest run of new tokens of any sequence (1 for a decode-only step).
    """

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    #: The CPU path's per-step plan (``kernels.torch_ref.ExtendAttentionPlan``), built by the first
    #: layer and reused by the others.
    torch_plan: object | None = field(default=None, repr=False)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store this step's K/V in the paged cache and compute attention for every new token.

    Args:
        query: ``[num_tokens, num_heads, head_dim]``.
        key, value: ``[num_tokens, num_kv_heads, head_dim]``.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        meta: the step's :class:`AttentionMetadata`.
        scale: softmax scale (``head_dim ** -0.5`` for Llama).

    Returns:
        ``[num_tokens, num_heads, head_dim]``.
    """
    if query.is_cuda:
        kernels.write_kv_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        if meta.is_decode_only:
            return kernels.paged_decode_attention(
                query, key_cache, value_cache, meta.block_table, meta.seq_lens, scale
            )
        return kernels.paged_extend_attention(
            query, key_cache, value_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, scale,
            max_query_len=meta.max_query_len,  # known on the host: spares a device sync
        )
    plan = meta.torch_plan
    if plan is None:
        plan = meta.torch_plan = ExtendAttentionPlan.build(
            meta.block_table, meta.query_start_loc, meta.seq_lens, key_cache.shape[1],
            query.shape[1] // key_cache.shape[2],
        )
        plan.slots_valid = bool((meta.slot_mapping >= 0).all())
    if plan.slots_valid:  # the twin's scatter without its per-call check for padding slots
        kvh, head_dim = key_cache.shape[2], key_cache.shape[3]
        key_cache.view(-1, kvh, head_dim).index_copy_(0, meta.slot_mapping, key)
        value_cache.view(-1, kvh, head_dim).index_copy_(0, meta.slot_mapping, value)
    else:
        kernels.write_kv_cache_torch(key, value, key_cache, value_cache, meta.slot_mapping)
    return kernels.paged_extend_attention_torch(
        query, key_cache, value_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, scale,
        plan=meta.torch_plan,
    )
