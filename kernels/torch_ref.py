"""Plain-torch PagedAttention operations: the reference for the Triton kernels and the CPU fallback.

(On the CPU with an fp32 cache the executor runs :mod:`kernels.paged_attention_cpu` instead, one
compiled call per layer; these twins serve fp16/bf16 caches and machines without a C compiler.)

(The attention's two matrix products run in :mod:`kernels.ordered_matmul`: in fp32 on the CPU a
small C kernel with a fixed order of summation, elsewhere torch.)

Shapes and names follow vLLM's PagedAttention (Kwon et al., "Efficient Memory Management for
Large Language Model Serving with PagedAttention", SOSP 2023):

- ``key_cache`` / ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``
- ``block_table``: ``[num_seqs, max_blocks_per_seq]`` int32, physical block ids
- ``slot_mapping``: ``[num_tokens]`` int64, ``block_id * block_size + offset``; negative = skip
- ``seq_lens``: ``[num_seqs]`` int32, tokens in the cache for each sequence (new ones included)

Grouped-query attention: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kernels.ordered_matmul import OrderedMatmul


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


#: Fewest keys in one chunk of the CPU attention path (see :func:`key_chunk_size`).
MIN_KEY_CHUNK = 64
#: Rows (query heads x tokens per KV head) in one query tile of a prefill (bounds the score matrix).
QUERY_TILE_ROWS = 512
#: Shifted scores are clamped here before ``exp``: CPU ``exp`` is 10x slower on -inf and 100x
#: slower where its result is subnormal (below e^-87.3). A probability under e^-87 (1.6e-38) thus
#: becomes 1.6e-38, which no fp32 sum that includes the row's maximum (probability 1) can see.
_EXP_FLOOR = -87.0


def key_chunk_size(block_size: int) -> int:
    """Keys per chunk of :func:`paged_extend_attention_torch` for a cache of ``block_size``.

    The smallest multiple of ``lcm(block_size, 64)`` that is at least :data:`MIN_KEY_CHUNK`: whole
    blocks (so a chunk is gathered block by block), and a multiple of 64 so every elementwise
    pass over the scores runs on whole SIMD vectors (see the notes on invariance there).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    unit = block_size * 64 // math.gcd(block_size, 64)
    return unit * max(1, -(-MIN_KEY_CHUNK // unit))


@dataclass
class _Gather:
    """The context of ``S`` sequences, gathered once per layer into buffers reused by every layer.

    Attributes:
        block_ids: ``[S * nb]`` int64 blocks to copy (``nb = nC * chunk / block_size`` per sequence;
            blocks past a sequence's own repeat its first block: in range, masked or zeroed).
        tail: ``[n]`` int64 flat positions at or after each sequence's length (V is zeroed there).
        num_seqs, num_chunks: ``S`` and ``nC``.
        kt: ``[S, nC, KVH, D, chunk]`` keys, transposed per chunk (allocated by the first layer).
        k: ``[S * nb, block_size, KVH, D]`` the keys as gathered, before the transposition.
        v: ``[S, nC, chunk, KVH, D]`` values.
    """

    block_ids: torch.Tensor
    tail: torch.Tensor
    num_seqs: int
    num_chunks: int
    kt: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass
class _Work:
    """Tokens attended together: ``S`` decodes with the same chunk count, or one prefill tile.

    Attributes:
        token_rows: ``[S * T]`` int64 rows of ``query`` (and of the output), sequence-major.
        first_row: ``>= 0`` when ``token_rows`` is the range ``first_row .. first_row + S*T - 1``.
        num_seqs, num_tokens: ``S`` and ``T`` (tokens per sequence).
        gather: index into the plan's ``gathers``.
        num_chunks: chunks the tokens can see (a prefix of the gathered ones).
        hidden: ``[1, S, nC, T, 1, C]`` bool, True where a key is after the token (masked).
        bufs: per-step buffers and their per-head views (built by the first layer).
    """

    token_rows: torch.Tensor
    first_row: int
    num_seqs: int
    num_tokens: int
    gather: int
    num_chunks: int
    hidden: torch.Tensor
    bufs: dict | None = None


@dataclass
class ExtendAttentionPlan:
    """What :func:`paged_extend_attention_torch` derives from a step's batch layout alone.

    The same for every layer of a step, so a caller that runs many layers builds it once
    (:meth:`build`) and passes it to each call; the plan also keeps the step's working buffers,
    so layers reuse them instead of allocating their own. A plan serves one query shape, dtype and
    device (those of its first call).

    Attributes:
        chunk: keys per chunk (:func:`key_chunk_size`).
        gathers: the :class:`_Gather` items.
        work: the :class:`_Work` items.
        num_tokens: rows of ``query``.
        slots_valid: whether every slot of the step's ``slot_mapping`` is >= 0 (set by callers
            that write the cache themselves; None if unknown).
    """

    chunk: int
    gathers: list[_Gather] = field(default_factory=list)
    work: list[_Work] = field(default_factory=list)
    num_tokens: int = 0
    slots_valid: bool | None = None

    @classmethod
    def build(
        cls,
        block_table: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        num_queries_per_kv: int,
    ) -> "ExtendAttentionPlan":
        """Plan a call; arguments as :func:`paged_extend_attention_torch`'s (shapes only)."""
        device = block_table.device
        chunk = key_chunk_size(block_size)
        starts = query_start_loc.tolist()
        lens = seq_lens.tolist()
        plan = cls(chunk=chunk, num_tokens=starts[-1])
        table = block_table.long()
        tile = max(1, QUERY_TILE_ROWS // num_queries_per_kv)

        def add_gather(seqs: list[int], seq_lens_: list[int], nc: int) -> int:
            nb = nc * chunk // block_size
            rows = table[seqs[0] : seqs[0] + 1] if len(seqs) == 1 else table.index_select(0, torch.tensor(seqs, device=device))
            if rows.shape[1] < nb:
                rows = torch.cat([rows, rows[:, :1].expand(-1, nb - rows.shape[1])], dim=1)
            rows = rows[:, :nb]
            lens_t = torch.tensor(seq_lens_, device=device)
            own = (lens_t + block_size - 1) // block_size
            ids = torch.where(torch.arange(nb, device=device)[None, :] < own[:, None], rows, rows[:, :1])
            tail = (torch.arange(nc * chunk, device=device)[None, :] >= lens_t[:, None]).flatten()
            plan.gathers.append(_Gather(ids.flatten(), tail.nonzero().squeeze(1), len(seqs), nc))
            return len(plan.gathers) - 1

        def hidden_mask(q_pos: torch.Tensor, nc: int) -> torch.Tensor:
            s, t = q_pos.shape
            key_pos = torch.arange(nc * chunk, device=device).view(1, nc, 1, chunk)
            return (key_pos > q_pos.view(s, 1, t, 1)).view(1, s, nc, t, 1, chunk)

        decodes: dict[int, list[int]] = {}
        for i, length in enumerate(lens):
            q_len = starts[i + 1] - starts[i]
            if q_len == 0 or length == 0:
                continue  # nothing to compute, or a token that sees nothing: zeros
            nc_all = -(-length // chunk)
            if q_len == 1:
                decodes.setdefault(nc_all, []).append(i)
                continue
            g = add_gather([i], [length], nc_all)
            first = length - q_len  # position of the first new token
            for t0 in range(0, q_len, tile):
                t1 = min(q_len, t0 + tile)
                nc = -(-(first + t1) // chunk)  # chunks the tile's last token can see
                pos = torch.arange(first + t0, first + t1, device=device).view(1, -1)
                rows = torch.arange(starts[i] + t0, starts[i] + t1, device=device)
                plan.work.append(_Work(rows, starts[i] + t0, 1, t1 - t0, g, nc, hidden_mask(pos, nc)))
        for nc, seqs in decodes.items():
            seq_lens_ = [lens[i] for i in seqs]
            g = add_gather(seqs, seq_lens_, nc)
            pos = torch.tensor(seq_lens_, device=device).view(-1, 1) - 1
            rows = [starts[i] for i in seqs]
            contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
            plan.work.append(_Work(torch.tensor(rows, device=device), rows[0] if contiguous else -1,
                                   len(seqs), 1, g, nc, hidden_mask(pos, nc)))
        return plan


def _work_buffers(w: _Work, gather: _Gather, kvh: int, group: int, head_dim: int, chunk: int,
                  dtype: torch.dtype, device: torch.device) -> dict:
    """Buffers of one work item and its two products, reused by every layer of a step."""
    s, nc, d = w.num_seqs, w.num_chunks, head_dim
    rows = w.num_tokens * group
    q = torch.empty((kvh, s, rows, d), dtype=dtype, device=device)
    scores = torch.empty((kvh, s, nc, rows, chunk), dtype=dtype, device=device)
    num = torch.empty((kvh, s, 1, rows, d), dtype=dtype, device=device)
    den = torch.empty((kvh, s, 1, rows), dtype=dtype, device=device)
    # Scores [rows, C] = Q [rows, D] @ K_chunk^T [D, C] per (KV head, sequence, chunk).
    kt = gather.kt[:, :nc].permute(2, 0, 1, 3, 4).unsqueeze(3)  # [KVH, S, nC, 1, D, C]
    q_as_a = q.view(kvh, s, 1, rows, 1, d).expand(-1, -1, nc, -1, -1, -1)
    # Outputs [rows, D] = P [rows, nC * C] @ V [nC * C, D] per (KV head, sequence), summed over
    # chunk 0, 1, ... and within a chunk over its keys in order; row sums are the denominators.
    p = scores.permute(0, 1, 3, 2, 4).unsqueeze(2)  # [KVH, S, 1, rows, nC, C]
    v = gather.v[:, :nc].permute(3, 0, 1, 2, 4).unsqueeze(2)  # [KVH, S, 1, nC, C, D]
    return {
        "q": q.view(kvh, s, w.num_tokens, group, d),
        "by_seq": scores.view(kvh, s, nc, w.num_tokens, group, chunk),
        "scores": scores,
        "qk": OrderedMatmul(q_as_a, kt, scores),
        "pv": OrderedMatmul(p, v, num, den),
        "out": num.view(kvh, s, w.num_tokens, group, d),
        "den": den.view(kvh, s, w.num_tokens, group, 1),
    }


def _attend(w: _Work, q: torch.Tensor) -> torch.Tensor:
    """Causal attention of one work item's scaled queries over its gathered chunks.

    Args:
        w: the work item, with its buffers.
        q: ``[KVH, S, T, G, D]``, already multiplied by the softmax scale.

    Returns:
        ``[KVH, S, T, G, D]`` (a view of a buffer: copy it out before the next layer).
    """
    b = w.bufs
    b["q"].copy_(q)
    b["qk"]()
    by_seq = b["by_seq"].masked_fill_(w.hidden, float("-inf"))
    by_seq.sub_(by_seq.amax(dim=(2, 5), keepdim=True))
    b["scores"].clamp_(min=_EXP_FLOOR).exp_()
    by_seq.masked_fill_(w.hidden, 0.0)  # hidden keys: exactly 0
    b["pv"]()
    return b["out"].div_(b["den"])


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
        seq_lens: ``[num_seqs]`` int32, context length including the query token (0 gives zeros).
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
    max_query_len: int | None = None,
    plan: ExtendAttentionPlan | None = None,
) -> torch.Tensor:
    """Prefill / extend attention over a paged context (covers decode, chunked prefill, prefix hits).

    Sequence ``i`` contributes ``q_len = query_start_loc[i+1] - query_start_loc[i]`` new tokens, at
    positions ``seq_lens[i] - q_len .. seq_lens[i] - 1``; their K/V must already be in the cache.
    Each new token attends causally to every cached token up to and including its own position.

    Args:
        query: ``[num_tokens, num_heads, head_dim]``, the sequences' new tokens back to back.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_table: ``[num_seqs, max_blocks_per_seq]`` int32 (or int64); entries past a
            sequence's own blocks are never read.
        query_start_loc: ``[num_seqs + 1]`` int32 cumulative query lengths, starting at 0.
        seq_lens: ``[num_seqs]`` int32 context lengths including the new tokens.
        scale: softmax scale.
        max_query_len: accepted for parity with the Triton kernel; unused.
        plan: :meth:`ExtendAttentionPlan.build` of the same layout, to share between layers.

    Returns:
        ``[num_tokens, num_heads, head_dim]`` in the query's dtype (fp16/bf16 inputs are computed
        in fp32). A token of a sequence with ``seq_len == 0`` gets zeros.

    How it works, and why a token's output does not depend on the batch:

    - Copies: the blocks holding each sequence's context are copied once per call (one
      ``index_select`` for K, one for V), rounded up to whole chunks of
      ``key_chunk_size(block_size)`` keys, and K once more, transposed per chunk (``[D, C]``, so the
      scores' product runs along keys); grouped-query heads are folded into the query side, so K/V
      are never repeated per query head. Only the tail of V past the context is written (zeroed,
      so stale or NaN cache entries cannot reach the output; stale keys are masked).
    - The two products, scores ``Q [rows, D] @ K_chunk^T [D, C]`` and outputs
      ``P [rows, keys] @ V [keys, D]``, run in :class:`kernels.ordered_matmul.OrderedMatmul`, which
      sums each output in one fixed order (ascending ``d``; ascending key, chunk by chunk) that
      depends on nothing but the output's own inputs: not on ``rows``, on the token's place among
      them, or on the CPU's instruction set. BLAS gives no such promise (MKL's sgemm rounds a
      one-row product differently from a 300-row one on its AVX2 path, the one AMD CPUs get).
    - Softmax: the maximum is exact in any order; ``exp`` runs over multiples of 64 floats (no scalar
      tail; its input is clamped at ``_EXP_FLOOR`` to stay off slow paths); denominators are summed
      by the same kernel in the same key order; keys past a token's position (within its chunks, or
      in chunks that only later tokens of a tile see) have probability exactly 0, and add nothing.

    So a token's output is the same whether it is computed alone (decode), inside a long prefill,
    in any chunk of a chunked prefill or again after preemption. Decodes (``q_len == 1``) with the
    same number of chunks run as one batched product; other sequences run one at a time in query
    tiles of about :data:`QUERY_TILE_ROWS` rows, each reading only the chunks it can see.
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    if num_tokens == 0:
        return out
    if plan is None:
        plan = ExtendAttentionPlan.build(block_table, query_start_loc, seq_lens, block_size, group)
    compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    chunk = plan.chunk
    device = query.device
    # [KVH, T, G, D], scaled: the only copy of the queries.
    q_all = (query.to(compute) * scale).reshape(num_tokens, num_kv_heads, group, head_dim).transpose(0, 1)
    for gather in plan.gathers:
        s, nc = gather.num_seqs, gather.num_chunks
        if gather.kt is None:
            gather.block_ids = gather.block_ids.to(key_cache.device)
            gather.tail = gather.tail.to(device)
            gather.kt = torch.empty((s, nc, num_kv_heads, head_dim, chunk), dtype=compute, device=device)
            gather.k = torch.empty((s * nc * chunk // block_size, block_size, num_kv_heads, head_dim),
                                   dtype=key_cache.dtype, device=key_cache.device)
            gather.v = torch.empty((s, nc, chunk, num_kv_heads, head_dim), dtype=compute, device=device)
        flat_v = gather.v.view(-1, block_size, num_kv_heads, head_dim)
        if value_cache.dtype == compute and value_cache.device == device:
            torch.index_select(value_cache, 0, gather.block_ids, out=flat_v)
        else:
            flat_v.copy_(value_cache.index_select(0, gather.block_ids))
        # Keys into a reused buffer (a new one per layer would be page-faulted in every time).
        torch.index_select(key_cache, 0, gather.block_ids, out=gather.k)
        per_chunk = chunk // block_size
        keys = gather.k.view(s, nc, per_chunk, block_size, num_kv_heads, head_dim).permute(0, 1, 4, 5, 2, 3)
        gather.kt.view(s, nc, num_kv_heads, head_dim, per_chunk, block_size).copy_(keys)
        if gather.tail.numel():
            gather.v.view(-1, num_kv_heads * head_dim).index_fill_(0, gather.tail, 0)
    for w in plan.work:
        if w.bufs is None:
            w.bufs = _work_buffers(w, plan.gathers[w.gather], num_kv_heads, group, head_dim, chunk, compute, device)
            w.token_rows = w.token_rows.to(device)
            w.hidden = w.hidden.to(device)
        n = w.num_seqs * w.num_tokens
        if w.first_row >= 0:
            q = q_all[:, w.first_row : w.first_row + n]
        else:
            q = q_all.index_select(1, w.token_rows)
        o = _attend(w, q.view(num_kv_heads, w.num_seqs, w.num_tokens, group, head_dim))  # [KVH, S, T, G, D]
        o = o.permute(1, 2, 0, 3, 4).reshape(n, num_heads, head_dim)
        if w.first_row >= 0:
            out[w.first_row : w.first_row + n] = o
        else:
            out[w.token_rows] = o.to(out.dtype)
    return out


def copy_blocks_torch(
    key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    """Copy whole blocks within each layer's cache (copy-on-write), in place.

    Args:
        key_caches, value_caches: one ``[num_blocks, ...]`` tensor per layer, block index first (the
            standard ``[num_blocks, block_size, num_kv_heads, head_dim]`` or the compiled CPU
            kernel's layout: a block is one slab either way).
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
        src_cache, dst_cache: ``[num_blocks, ...]``, block index first, the same layout and dtype
            (see :func:`copy_blocks_torch`).
        block_mapping: ``[num_pairs, 2]`` int64 of ``(src_block, dst_block)``.
    """
    if block_mapping.numel() == 0:
        return
    src = block_mapping[:, 0].to(src_cache.device)
    dst = block_mapping[:, 1].to(dst_cache.device)
    dst_cache.index_copy_(0, dst, src_cache.index_select(0, src).to(dst_cache.device))
