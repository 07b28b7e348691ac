"""Plain-torch PagedAttention operations: the CPU path and the reference for the Triton kernels.

Shapes and names follow vLLM's PagedAttention (Kwon et al., "Efficient Memory Management for
Large Language Model Serving with PagedAttention", SOSP 2023):

- ``key_cache`` / ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``
- ``block_table``: ``[num_seqs, max_blocks_per_seq]`` int32, physical block ids
- ``slot_mapping``: ``[num_tokens]`` int64, ``block_id * block_size + offset``; negative = skip
- ``seq_lens``: ``[num_seqs]`` int32, tokens in the cache for each sequence (new ones included)

Grouped-query attention: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
"""

from __future__ import annotations

import torch


def write_kv_cache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V into their cache slots, in place.

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]``, same dtype as the caches.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        slot_mapping: ``[num_tokens]`` int64; a negative slot marks a padding token, not written.
    """
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def _gather_context(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence, ``[length, num_kv_heads, head_dim]``.

    Copies only the blocks that hold those tokens (ceil(length / block_size) of them).
    """
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[blocks[:num_blocks].long()].flatten(0, 1)[:length]


def paged_decode_attention_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence attends to that sequence's whole cached context.

    Args:
        query: ``[num_seqs, num_heads, head_dim]``.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_table: ``[num_seqs, max_blocks_per_seq]`` int32.
        seq_lens: ``[num_seqs]`` int32, context length including the query token (>= 1).
        scale: softmax scale, usually ``head_dim ** -0.5``.

    Returns:
        ``[num_seqs, num_heads, head_dim]`` in the query's dtype.
    """
    query_start_loc = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    return paged_extend_attention_torch(
        query, key_cache, value_cache, block_table, query_start_loc, seq_lens, scale
    )


def paged_extend_attention_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Prefill / extend attention over a paged context (covers decode, chunked prefill, prefix hits).

    Sequence ``i`` contributes ``q_len = query_start_loc[i+1] - query_start_loc[i]`` new tokens, at
    positions ``seq_lens[i] - q_len .. seq_lens[i] - 1``; their K/V must already be in the cache.
    Each new token attends causally to every cached token up to and including its own position.

    Args:
        query: ``[num_tokens, num_heads, head_dim]``, the sequences' new tokens back to back.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_table: ``[num_seqs, max_blocks_per_seq]`` int32.
        query_start_loc: ``[num_seqs + 1]`` int32 cumulative query lengths, starting at 0.
        seq_lens: ``[num_seqs]`` int32 context lengths including the new tokens.
        scale: softmax scale.

    Returns:
        ``[num_tokens, num_heads, head_dim]`` in the query's dtype.
    """
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q = query[starts[i] : starts[i + 1]]  # [q_len, H, D]
        q_len = q.shape[0]
        if q_len == 0:
            continue
        k = _gather_context(key_cache, block_table[i], seq_len)  # [L, KVH, D]
        v = _gather_context(value_cache, block_table[i], seq_len)
        # [H, q_len, D] x [KVH, L, D]: SDPA broadcasts KV heads over their query group.
        qh = q.transpose(0, 1)
        kh = k.transpose(0, 1).repeat_interleave(group, dim=0) if group > 1 else k.transpose(0, 1)
        vh = v.transpose(0, 1).repeat_interleave(group, dim=0) if group > 1 else v.transpose(0, 1)
        if q_len == 1:
            mask = None
        else:
            # Query j sits at absolute position seq_len - q_len + j and sees keys 0..that position.
            q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
            mask = torch.arange(seq_len).unsqueeze(0) <= q_pos
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        out[starts[i] : starts[i + 1]] = o.transpose(0, 1)
    return out


def copy_blocks_torch(
    key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    """Copy whole blocks within each layer's cache (copy-on-write), in place.

    Args:
        key_caches, value_caches: one ``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer.
        block_mapping: ``[num_pairs, 2]`` int64 of ``(src_block, dst_block)``.
    """
    if block_mapping.numel() == 0:
        return
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    for cache in (*key_caches, *value_caches):
        cache.index_copy_(0, dst.to(cache.device), cache.index_select(0, src.to(cache.device)))


def swap_blocks_torch(src_cache: torch.Tensor, dst_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy blocks between two caches, possibly on different devices (swap-out / swap-in).

    Args:
        src_cache, dst_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, same dtype.
        block_mapping: ``[num_pairs, 2]`` int64 of ``(src_block, dst_block)``.
    """
    if block_mapping.numel() == 0:
        return
    src = block_mapping[:, 0].to(src_cache.device)
    dst = block_mapping[:, 1].to(dst_cache.device)
    dst_cache.index_copy_(0, dst, src_cache.index_select(0, src).to(dst_cache.device))
