"""Triton paged extend (prefill) attention: new tokens attend causally to a paged context.

Covers plain prefill (nothing cached yet), chunked prefill (earlier chunks cached) and prefix-cache
hits (a shared prefix cached): sequence ``i`` brings ``q_len_i`` new tokens at positions
``seq_lens[i] - q_len_i .. seq_lens[i] - 1``; their K/V are already in the cache, and each attends
to every cached position up to and including its own. Query lengths differ freely within a launch.

Algorithm sources: paged KV cache, Kwon et al., "Efficient Memory Management for Large Language
Model Serving with PagedAttention", SOSP 2023; tiled causal attention with online softmax and fp32
accumulation, FlashAttention (Dao et al., NeurIPS 2022) after Milakov & Gimelshein (2018).

Each program handles one tile of ``block_m`` new tokens of one sequence for one query head. Its
key loop has two phases: key tiles every row of the tile may see (no mask), then the tiles that
cross the causal diagonal or the end of the context (masked).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._attention_tile import attend_span
from kernels._common import (
    cdiv,
    check_block_table,
    check_cache_pair,
    check_dim,
    check_index,
    check_launchable,
    check_query_heads,
    check_seq_lens,
    device_guard,
    next_pow2,
    use_ieee_dot,
)

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 64


@triton.jit
def _paged_extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bts,
    stride_btb,
    stride_ot,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    q_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_M >= q_len:  # this sequence has fewer new tokens
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens cached before this step's

    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    # Rows past q_len borrow the last row's position so they never see an empty key set.
    q_pos = ctx_len + tl.minimum(offs_m, q_len - 1)
    tok = q_start.to(tl.int64) + offs_m
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    kv_head = head // GROUP
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bts
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    first_pos = ctx_len + q_block * BLOCK_M  # smallest query position in this tile
    kv_end = tl.minimum(first_pos + BLOCK_M, seq_len)  # one past the largest
    # Whole tiles of keys at or before first_pos are visible to every row (no mask); the tiles
    # crossing the diagonal are masked causally and at the context's end.
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    m_i, l_i, acc = attend_span(
        q, m_i, l_i, acc, 0, full_end, kv_end, q_pos, k_base, v_base, bt_row, stride_btb,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, scale_log2e, offs_d, d_mask,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, CAUSAL=True, IEEE=IEEE,
    )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_extend_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = 4,
) -> torch.Tensor:
    """Paged prefill / extend attention in Triton (twin: ``paged_extend_attention_torch``).

    Sequence ``i`` contributes ``q_len = query_start_loc[i+1] - query_start_loc[i]`` new tokens
    (0 allowed) at positions ``seq_lens[i] - q_len .. seq_lens[i] - 1``, whose K/V must already be
    in the cache; each attends causally to every cached token up to its own position. Query head
    ``h`` uses KV head ``h // (num_heads // num_kv_heads)``. fp32 accumulation.

    Args:
        query: ``[num_tokens, num_heads, head_dim]``, the sequences' new tokens back to back;
            float32 / float16 / bfloat16, the caches' dtype.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_table: ``[num_seqs, max_blocks_per_seq]`` int32 (or int64) physical block ids.
        query_start_loc: ``[num_seqs + 1]`` int32 (or int64) cumulative query lengths from 0.
        seq_lens: ``[num_seqs]`` int32 (or int64) context lengths including the new tokens.
        scale: softmax scale.
        max_query_len: optional host-side maximum of the query lengths (sizes the grid). If
            omitted it is read from ``query_start_loc``, which on CUDA costs a device sync.
        block_m, block_n: query rows and key positions per tile (powers of two >= 16).
        num_warps: Triton launch option.

    Returns:
        ``[num_tokens, num_heads, head_dim]`` in the query's dtype.

    Raises:
        ValueError: wrong ranks, mismatched shapes / dtypes / devices, ``num_heads`` not a multiple
            of ``num_kv_heads``, non-integer index tensors, bad tuning arguments, inconsistent
            ``query_start_loc`` / ``seq_lens`` (content checks for CPU tensors only), or CPU
            tensors without the Triton interpreter.
    """
    _, block_size, num_kv_heads, head_dim = check_cache_pair(key_cache, value_cache)
    group = check_query_heads(query, key_cache, "[num_tokens, num_heads, head_dim]")
    num_tokens, num_heads = query.shape[0], query.shape[1]
    check_dim("seq_lens", seq_lens, 1, "[num_seqs]")
    num_seqs = seq_lens.shape[0]
    check_block_table(block_table, num_seqs)
    check_seq_lens(seq_lens, num_seqs, block_table, block_size)
    check_dim("query_start_loc", query_start_loc, 1, "[num_seqs + 1]")
    check_index("query_start_loc", query_start_loc)
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(f"query_start_loc has {query_start_loc.shape[0]} entries, expected num_seqs + 1 = {num_seqs + 1}")
    if num_seqs > 65535:
        raise ValueError(f"at most 65535 sequences per launch (a CUDA grid dimension), got {num_seqs}")
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    check_launchable(
        _paged_extend_kernel, "paged_extend_attention", query, key_cache, value_cache, block_table, query_start_loc, seq_lens
    )
    if query_start_loc.device.type == "cpu":
        q_lens = query_start_loc[1:] - query_start_loc[:-1]
        if int(query_start_loc[0]) != 0 or int(query_start_loc[-1]) != num_tokens:
            raise ValueError(
                f"query_start_loc must run from 0 to num_tokens={num_tokens}, got "
                f"{int(query_start_loc[0])}..{int(query_start_loc[-1])}"
            )
        if num_seqs and int(q_lens.min()) < 0:
            raise ValueError("query_start_loc must be non-decreasing")
        if num_seqs and bool((q_lens > seq_lens.to(q_lens.dtype)).any()):
            raise ValueError("a sequence has more new tokens than its seq_len")

    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0 or num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len <= 0:
        return out
    scale_log2e = float(scale) * math.log2(math.e)
    grid = (cdiv(max_query_len, block_m), num_seqs, num_heads)
    with device_guard(query):
        _paged_extend_kernel[grid](
            query, key_cache, value_cache, block_table, query_start_loc, seq_lens, out, scale_log2e,
            *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(), *out.stride(),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=max(16, next_pow2(head_dim)), IEEE=use_ieee_dot(query.dtype), num_warps=num_warps,
        )  # fmt: skip
    return out
