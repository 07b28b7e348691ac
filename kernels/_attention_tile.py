"""The key loop shared by the decode and extend kernels: online softmax over key/value tiles.

Online softmax (Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018), as used
by FlashAttention (Dao et al., NeurIPS 2022): keep a running row maximum ``m``, a running
denominator ``l`` and an unnormalised accumulator ``acc``; each new tile rescales them by
``exp(m_old - m_new)``. Scores are kept in the base-2 domain (``scale * log2(e)`` folded into the
scale) so the kernels use ``exp2``.

Keys are read through the block table, PagedAttention-style (Kwon et al., SOSP 2023): key position
``pos`` lives in physical block ``block_table[seq, pos // BLOCK_SIZE]``, row ``pos % BLOCK_SIZE``.
Gathering the block id per key position (rather than per block) lets any ``block_size`` work with
any tile width.

Both kernels run :func:`attend_span`: whole key tiles every query row may see, without masks, then
the tiles that cross the end of the context (and, for prefill, the causal diagonal), masked.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tile(
    q,
    m_i,
    l_i,
    acc,
    t0,
    kv_end,
    q_pos,
    k_base,
    v_base,
    bt_row,
    stride_btb,
    stride_kb,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vd,
    scale_log2e,
    offs_d,
    d_mask,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BOUNDED: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Fold keys ``t0 .. t0 + BLOCK_N - 1`` into ``(m_i, l_i, acc)``.

    ``q``: ``[R, BLOCK_D]`` query rows; ``k_base`` / ``v_base``: cache pointers already offset to the
    KV head; ``bt_row``: the sequence's block-table row. ``BOUNDED`` masks keys ``>= kv_end``;
    ``CAUSAL`` masks keys after each row's ``q_pos`` (``[R]``). Every row must see at least one key
    over the whole loop, or its ``l_i`` stays 0.
    """
    pos = t0 + tl.arange(0, BLOCK_N)
    if BOUNDED:
        n_mask = pos < kv_end
        block = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btb, mask=n_mask, other=0).to(tl.int64)
    else:
        block = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btb).to(tl.int64)
    row = pos % BLOCK_SIZE
    # K^T tile [BLOCK_D, BLOCK_N]; V tile [BLOCK_N, BLOCK_D].
    k_ptrs = k_base + block[None, :] * stride_kb + row[None, :] * stride_ks + offs_d[:, None] * stride_kd
    v_ptrs = v_base + block[:, None] * stride_vb + row[:, None] * stride_vs + offs_d[None, :] * stride_vd
    if BOUNDED:
        k = tl.load(k_ptrs, mask=d_mask[:, None] & n_mask[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * scale_log2e
    if BOUNDED:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    if CAUSAL:
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if BOUNDED:
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    else:
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def attend_span(
    q,
    m_i,
    l_i,
    acc,
    start,
    full_end,
    kv_end,
    q_pos,
    k_base,
    v_base,
    bt_row,
    stride_btb,
    stride_kb,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vd,
    scale_log2e,
    offs_d,
    d_mask,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Fold keys ``start .. kv_end - 1`` into ``(m_i, l_i, acc)``, ``BLOCK_N`` keys per tile.

    Tiles starting before ``full_end`` (a multiple of ``BLOCK_N`` past ``start``, at most
    ``kv_end``) must be visible in full to every row: they run without masks. The tiles from
    ``full_end`` on are masked at ``kv_end`` and, with ``CAUSAL``, after each row's ``q_pos``.
    Arguments as in :func:`attend_tile`.
    """
    for t0 in range(start, full_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, t0, kv_end, q_pos, k_base, v_base, bt_row, stride_btb,
            stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, scale_log2e, offs_d, d_mask,
            BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, BOUNDED=False, CAUSAL=False, IEEE=IEEE,
        )  # fmt: skip
    for t0 in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, t0, kv_end, q_pos, k_base, v_base, bt_row, stride_btb,
            stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, scale_log2e, offs_d, d_mask,
            BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, BOUNDED=True, CAUSAL=CAUSAL, IEEE=IEEE,
        )  # fmt: skip
    return m_i, l_i, acc
