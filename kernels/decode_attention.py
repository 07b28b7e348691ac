"""Triton paged decode attention: one new token per sequence attends to its whole paged context.

Algorithm sources:

- Paged KV cache and block tables: Kwon et al., "Efficient Memory Management for Large Language
  Model Serving with PagedAttention", SOSP 2023.
- Online softmax over key tiles with fp32 accumulation: Milakov & Gimelshein, "Online normalizer
  calculation for softmax", 2018; FlashAttention, Dao et al., NeurIPS 2022.
- Split-K over the context ("context partitions", then a reduce kernel): FlashDecoding, Dao,
  Haziza, Massa & Sizov, "Flash-Decoding for long-context inference", 2023 (also vLLM's
  PagedAttention V2).

Each program handles one (sequence, KV head) pair and all query heads of that KV head's group
(grouped-query attention), so every K/V tile is read once per group; the group's heads are padded
to 16 rows so the score and value products run as ``tl.dot``.
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
    check_launchable,
    check_query_heads,
    check_seq_lens,
    device_guard,
    multiprocessor_count,
    next_pow2,
    use_ieee_dot,
)

#: Tokens per context partition of the split-K path (a multiple of every ``block_n`` used).
DEFAULT_PARTITION_SIZE = 512
#: The split-K path is used only when the context fills at least this many whole partitions.
SPLIT_MIN_PARTITIONS = 2
#: ... and only while ``num_seqs * num_kv_heads`` programs are fewer than this many per SM.
SPLIT_MAX_PROGRAMS_PER_SM = 4
#: At most this many partitions per sequence: longer contexts get longer partitions.
MAX_PARTITIONS = 256
#: Key positions per loop iteration.
DEFAULT_BLOCK_N = 64


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    scale_log2e,
    stride_qs,
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
    stride_os,
    stride_oh,
    stride_od,
    num_partitions,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    if SPLIT:
        start = part * PARTITION_SIZE
        end = tl.minimum(start + PARTITION_SIZE, seq_len)
    else:
        start = 0
        end = seq_len

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    seq64 = seq.to(tl.int64)
    q = tl.load(
        q_ptr + seq64 * stride_qs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    bt_row = block_table_ptr + seq64 * stride_bts
    q_pos = offs_g  # unused: decode is not causal within the context
    # Whole tiles of the context need no mask; a partition past the end (end < start) has none.
    full_end = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
    m_i, l_i, acc = attend_span(
        q, m_i, l_i, acc, start, full_end, end, q_pos, k_base, v_base, bt_row, stride_btb,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, scale_log2e, offs_d, d_mask,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, CAUSAL=False, IEEE=IEEE,
    )  # fmt: skip

    row_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        # Unnormalised partial results: acc [S, H, P, D]; (m, l) [S, H, P, 2], fp32.
        idx = (seq64 * (GROUP * tl.num_programs(1)) + heads) * num_partitions + part
        tl.store(part_acc_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_mask)
        tl.store(part_ml_ptr + idx * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + idx * 2 + 1, l_i, mask=g_mask)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # seq_len 0 gives zeros, not NaN
        out = acc / l_safe[:, None]
        o_ptrs = out_ptr + seq64 * stride_os + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _paged_decode_reduce_kernel(
    part_acc_ptr,
    part_ml_ptr,
    seq_lens_ptr,
    out_ptr,
    stride_os,
    stride_oh,
    stride_od,
    num_partitions,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
):
    # One program per (sequence, query head): merge its partitions' (m, l, acc) into the output.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    used = (seq_len + PARTITION_SIZE - 1) // PARTITION_SIZE
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_mask = offs_p < used
    d_mask = offs_d < HEAD_DIM
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_partitions
    m = tl.load(part_ml_ptr + (base + offs_p) * 2, mask=p_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + (base + offs_p) * 2 + 1, mask=p_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # seq_len 0: no partitions, no NaN
    w = tl.where(p_mask, tl.exp2(m - m_max), 0.0)
    denom = tl.sum(w * l, 0)
    acc = tl.load(
        part_acc_ptr + (base + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=p_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    num = tl.sum(acc * w[:, None], 0)
    out = num / tl.where(denom > 0.0, denom, 1.0)
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def partition_size_for(max_context: int, block_n: int = DEFAULT_BLOCK_N) -> int:
    """Context partition length for the split-K path: ``DEFAULT_PARTITION_SIZE`` tokens, grown (in
    multiples of ``block_n``) so a sequence of ``max_context`` tokens has at most ``MAX_PARTITIONS``."""
    size = max(DEFAULT_PARTITION_SIZE, cdiv(max_context, MAX_PARTITIONS))
    return cdiv(size, block_n) * block_n


def use_split_k(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device | str = "cuda") -> bool:
    """The split-K heuristic: split long contexts when there are too few programs to fill the GPU.

    Returns True when a ``max_context``-token context fills at least ``SPLIT_MIN_PARTITIONS`` (2)
    whole partitions of :func:`partition_size_for` tokens (>= 1024 tokens by default) *and* the plain
    kernel would launch fewer than ``SPLIT_MAX_PROGRAMS_PER_SM`` (4) programs (one per sequence
    and KV head) per streaming multiprocessor. ``max_context`` is an upper bound on any sequence's
    length (by default the block table's capacity), so deciding costs no device sync.
    """
    device = torch.device(device)
    if max_context < SPLIT_MIN_PARTITIONS * partition_size_for(max_context):
        return False
    return num_seqs * num_kv_heads < SPLIT_MAX_PROGRAMS_PER_SM * multiprocessor_count(device)


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    split_k: bool | None = None,
    max_seq_len: int | None = None,
    partition_size: int | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = 4,
) -> torch.Tensor:
    """Paged decode attention in Triton (twin: ``paged_decode_attention_torch``).

    One query token per sequence attends to that sequence's first ``seq_lens[i]`` cached tokens
    (its own K/V included, already written), read through ``block_table``. Query head ``h`` uses KV
    head ``h // (num_heads // num_kv_heads)``. Online softmax over key tiles, fp32 accumulation.

    Args:
        query: ``[num_seqs, num_heads, head_dim]``, float32 / float16 / bfloat16, the caches' dtype.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_table: ``[num_seqs, max_blocks_per_seq]`` int32 (or int64) physical block ids; only
            the first ``ceil(seq_lens[i] / block_size)`` entries of row ``i`` are read.
        seq_lens: ``[num_seqs]`` int32 (or int64) context lengths including the query token. A
            length of 0 yields a zero output row.
        scale: softmax scale, usually ``head_dim ** -0.5``.
        split_k: force the split-K path (True) or the single-pass path (False); None (default)
            lets :func:`use_split_k` decide.
        max_seq_len: optional host-side upper bound on ``seq_lens`` (sizes the split-K grid);
            default ``block_table.shape[1] * block_size``. Must not be below the true maximum.
        partition_size: split-K partition length in tokens (a multiple of ``block_n``); default
            :func:`partition_size_for`.
        block_n: key positions per tile (power of two >= 16). num_warps: Triton launch option.

    Returns:
        ``[num_seqs, num_heads, head_dim]`` in the query's dtype.

    Raises:
        ValueError: wrong ranks, mismatched shapes / dtypes / devices, ``num_heads`` not a multiple
            of ``num_kv_heads``, non-integer index tensors, bad tuning arguments, ``seq_lens`` over
            the block table's capacity (checked for CPU tensors only), or CPU tensors without
            the Triton interpreter.
    """
    _, block_size, num_kv_heads, head_dim = check_cache_pair(key_cache, value_cache)
    group = check_query_heads(query, key_cache, "[num_seqs, num_heads, head_dim]")
    num_seqs, num_heads = query.shape[0], query.shape[1]
    check_block_table(block_table, num_seqs)
    check_seq_lens(seq_lens, num_seqs, block_table, block_size)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    check_launchable(_paged_decode_kernel, "paged_decode_attention", query, key_cache, value_cache, block_table, seq_lens)

    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    max_context = max_seq_len if max_seq_len is not None else block_table.shape[1] * block_size
    if max_context < 0:
        raise ValueError(f"max_seq_len must be >= 0, got {max_context}")
    if partition_size is None:
        partition_size = partition_size_for(max_context, block_n)
    elif partition_size < block_n or partition_size % block_n:
        raise ValueError(f"partition_size ({partition_size}) must be a positive multiple of block_n ({block_n})")
    if split_k is None:
        split_k = use_split_k(num_seqs, num_kv_heads, max_context, query.device)
    num_partitions = max(1, cdiv(max_context, partition_size)) if split_k else 1

    block_d = max(16, next_pow2(head_dim))
    meta = dict(
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, next_pow2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        PARTITION_SIZE=partition_size,
        SPLIT=bool(split_k),
        IEEE=use_ieee_dot(query.dtype),
        num_warps=num_warps,
    )
    if split_k:
        part_acc = torch.empty((num_seqs, num_heads, num_partitions, head_dim), dtype=torch.float32, device=query.device)
        part_ml = torch.empty((num_seqs, num_heads, num_partitions, 2), dtype=torch.float32, device=query.device)
    else:
        part_acc = part_ml = out  # unused
    scale_log2e = float(scale) * math.log2(math.e)
    with device_guard(query):
        _paged_decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
            query, key_cache, value_cache, block_table, seq_lens, out, part_acc, part_ml, scale_log2e,
            *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(), *out.stride(),
            num_partitions, **meta,
        )  # fmt: skip
        if split_k:
            _paged_decode_reduce_kernel[(num_seqs, num_heads)](
                part_acc, part_ml, seq_lens, out, *out.stride(), num_partitions,
                HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim), BLOCK_P=max(2, next_pow2(num_partitions)),
                PARTITION_SIZE=partition_size, num_warps=4,
            )  # fmt: skip
    return out
