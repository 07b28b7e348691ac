"""Extend (prefill / chunked prefill / prefix-hit) attention: the Triton kernel (under the
interpreter) and its torch twin against dense causal attention computed without pages.

Each sequence's K/V is built as contiguous tensors, scattered by hand into a NaN-filled paged pool
through shuffled block ids, and the new tokens' outputs are compared with float64 causal attention
over the contiguous tensors.
"""

import os

# Must run before kernels' Triton modules are first imported (checked below).
os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402

if not kernels.triton_interpreted():
    raise RuntimeError(
        "kernels' Triton modules were imported before TRITON_INTERPRET=1 was set (another test module "
        "or conftest imported them first), so the kernels are compiled for a GPU and cannot run on CPU "
        "tensors. Set TRITON_INTERPRET=1 in the environment, or import kernels' Triton modules only here."
    )

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 3, 64
ATOL = RTOL = 1e-5


def make_contexts(lengths, num_kv_heads, head_dim, gen, dtype=torch.float32):
    return [
        (
            torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype),
            torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype),
        )
        for n in lengths
    ]


def page_contexts(contexts, block_size, gen, spare_blocks=3):
    """Scatter contiguous K/V into a NaN-filled pool via shuffled block ids (see test_kernels.py)."""
    kvh, d, dtype = contexts[0][0].shape[1], contexts[0][0].shape[2], contexts[0][0].dtype
    per_seq = [math.ceil(k.shape[0] / block_size) for k, _ in contexts]
    num_blocks = sum(per_seq) + spare_blocks
    key_cache = torch.full((num_blocks, block_size, kvh, d), float("nan"), dtype=dtype)
    value_cache = torch.full_like(key_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(contexts), max(per_seq) + 1), perm[-1], dtype=torch.int32)
    used = 0
    for i, (k, v) in enumerate(contexts):
        for j in range(per_seq[i]):
            block = perm[used]
            used += 1
            table[i, j] = block
            n = min(block_size, k.shape[0] - j * block_size)
            key_cache[block, :n] = k[j * block_size : j * block_size + n]
            value_cache[block, :n] = v[j * block_size : j * block_size + n]
    seq_lens = torch.tensor([k.shape[0] for k, _ in contexts], dtype=torch.int32)
    return key_cache, value_cache, table, seq_lens


def dense_attention(q, k, v, scale):
    """float64 causal attention of ``q`` ``[Q, H, D]`` (positions L-Q..L-1) over ``k``, ``v`` ``[L, KVH, D]``."""
    num_q, num_heads = q.shape[0], q.shape[1]
    length, num_kv = k.shape[0], k.shape[1]
    kv_of_head = torch.arange(num_heads) // (num_heads // num_kv)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()[:, kv_of_head]) * scale
    visible = torch.arange(length)[None, :] <= torch.arange(length - num_q, length)[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.double()[:, kv_of_head])


def dense_extend(query, query_lens, contexts, scale):
    outs, start = [], 0
    for q_len, (k, v) in zip(query_lens, contexts):
        if q_len:
            outs.append(dense_attention(query[start : start + q_len], k, v, scale))
        start += q_len
    return torch.cat(outs)


def query_start_loc(query_lens):
    return torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32)


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def mixed_batch(block_size, gen):
    """(cached tokens, new tokens) per sequence: whole-sequence prefill, a decode-like single
    token, chunks and prefix hits around block boundaries, a sequence with no new tokens, random."""
    bs = block_size
    pairs = [
        (0, 37),  # plain prefill: q_len == the whole sequence
        (40, 1),  # one new token
        (0, 1),  # a one-token prompt
        (bs - 1, 5),
        (bs, bs + 1),  # prefix hit of exactly one block
        (2 * bs + 1, bs - 1),
        (9, 0),  # no new tokens this step
    ]
    pairs.append((int(torch.randint(0, 40, (1,), generator=gen)), int(torch.randint(2, 40, (1,), generator=gen))))
    return pairs


@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("tiles", [None, (16, 16)], ids=["default-tiles", "tiles-16"])
def test_extend_matches_dense(block_size, tiles):
    gen = torch.Generator().manual_seed(200 + block_size)
    pairs = mixed_batch(block_size, gen)
    contexts = make_contexts([c + q for c, q in pairs], NUM_KV_HEADS, HEAD_DIM, gen)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, block_size, gen)
    query_lens = [q for _, q in pairs]
    qsl = query_start_loc(query_lens)
    query = torch.randn((sum(query_lens), NUM_HEADS, HEAD_DIM), generator=gen)
    scale = HEAD_DIM**-0.5
    expected = dense_extend(query, query_lens, contexts, scale)
    tuning = dict(block_m=tiles[0], block_n=tiles[1]) if tiles else {}

    out = kernels.paged_extend_attention(query, key_cache, value_cache, table, qsl, seq_lens, scale, **tuning)
    twin = kernels.paged_extend_attention_torch(query, key_cache, value_cache, table, qsl, seq_lens, scale)

    assert out.shape == query.shape and out.dtype == query.dtype
    assert_close(out, expected)
    assert_close(twin, expected)


def test_extend_with_single_tokens_equals_decode():
    gen = torch.Generator().manual_seed(3)
    lengths = [1, 15, 16, 17, 50]
    contexts = make_contexts(lengths, NUM_KV_HEADS, HEAD_DIM, gen)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, 16, gen)
    query = torch.randn((len(lengths), NUM_HEADS, HEAD_DIM), generator=gen)
    qsl = torch.arange(len(lengths) + 1, dtype=torch.int32)
    expected = dense_extend(query, [1] * len(lengths), contexts, 0.125)
    extend = kernels.paged_extend_attention(query, key_cache, value_cache, table, qsl, seq_lens, 0.125, max_query_len=1)
    decode = kernels.paged_decode_attention(query, key_cache, value_cache, table, seq_lens, 0.125)
    assert_close(extend, expected)
    assert_close(decode, expected)


def test_chunked_prefill_pipeline_equals_full_prefill():
    # Two prompts prefilled in chunks of different sizes: each step writes the chunk's K/V with the
    # Triton cache-write kernel, then attends with the extend kernel. The concatenated chunk outputs
    # must equal causal attention over the whole prompt.
    gen = torch.Generator().manual_seed(4)
    block_size, lengths = 8, [45, 20]
    chunks = [[16, 20, 9], [1, 19, 0]]  # per sequence, per step
    contexts = make_contexts(lengths, NUM_KV_HEADS, HEAD_DIM, gen)
    queries = [torch.randn((n, NUM_HEADS, HEAD_DIM), generator=gen) for n in lengths]
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 2
    key_cache = torch.full((num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros((2, 6), dtype=torch.int32)
    table[0, :6] = perm[:6]
    table[1, :3] = perm[6:9]
    done = [0, 0]
    outputs = [[], []]
    for step in range(3):
        q_lens = [chunks[i][step] for i in range(2)]
        keys, values, queries_step, slots = [], [], [], []
        for i in range(2):
            lo, hi = done[i], done[i] + q_lens[i]
            keys.append(contexts[i][0][lo:hi])
            values.append(contexts[i][1][lo:hi])
            queries_step.append(queries[i][lo:hi])
            slots += [int(table[i, p // block_size]) * block_size + p % block_size for p in range(lo, hi)]
            done[i] = hi
        kernels.write_kv_cache(torch.cat(keys), torch.cat(values), key_cache, value_cache, torch.tensor(slots))
        query = torch.cat(queries_step)
        out = kernels.paged_extend_attention(
            query, key_cache, value_cache, table, query_start_loc(q_lens),
            torch.tensor(done, dtype=torch.int32), 0.125, block_m=16, block_n=16,
        )  # fmt: skip
        outputs[0].append(out[: q_lens[0]])
        outputs[1].append(out[q_lens[0] :])
    for i in range(2):
        assert_close(torch.cat(outputs[i]), dense_attention(queries[i], *contexts[i], 0.125))


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, dtype",
    [(4, 4, 32, torch.float32), (8, 1, 80, torch.float32), (NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, torch.float16)],
    ids=["mha", "mqa-hd80", "fp16"],
)
def test_extend_other_shapes_and_fp16(num_heads, num_kv_heads, head_dim, dtype):
    # (No bfloat16 under the interpreter: triton-lang/triton#11584; the GPU script checks it.)
    gen = torch.Generator().manual_seed(num_heads + head_dim)
    pairs = [(0, 20), (17, 3), (5, 1)]
    contexts = make_contexts([c + q for c, q in pairs], num_kv_heads, head_dim, gen, dtype)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, 8, gen)
    query_lens = [q for _, q in pairs]
    query = torch.randn((sum(query_lens), num_heads, head_dim), generator=gen).to(dtype)
    expected = dense_extend(query, query_lens, contexts, 0.2)
    out = kernels.paged_extend_attention(
        query, key_cache, value_cache, table, query_start_loc(query_lens), seq_lens, 0.2, block_m=16, block_n=16
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.dtype == dtype
    assert_close(out, expected, atol=tol, rtol=tol)


def test_extend_comparison_can_fail():
    # A causality bug (the twin's output for a non-causal mask) or a corrupted cache entry must be caught.
    gen = torch.Generator().manual_seed(12)
    contexts = make_contexts([24], NUM_KV_HEADS, HEAD_DIM, gen)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, 8, gen)
    query = torch.randn((24, NUM_HEADS, HEAD_DIM), generator=gen)
    expected = dense_extend(query, [24], contexts, 0.125)
    qsl = query_start_loc([24])
    as_decode = kernels.paged_decode_attention_torch(
        query, key_cache, value_cache, table.expand(24, -1), torch.full((24,), 24, dtype=torch.int32), 0.125
    )  # every token sees all 24 keys: not causal
    with pytest.raises(AssertionError):
        assert_close(as_decode, expected)
    corrupted = key_cache.clone()
    corrupted[int(table[0, 2]), 7, 0] *= 2.0  # the last key: only the last query sees it
    out = kernels.paged_extend_attention(query, corrupted, value_cache, table, qsl, seq_lens, 0.125)
    assert_close(out[:23], expected[:23])
    with pytest.raises(AssertionError):
        assert_close(out, expected)


def _extend_args():
    return dict(
        query=torch.zeros((5, NUM_HEADS, 16)),
        key_cache=torch.zeros((4, 8, NUM_KV_HEADS, 16)),
        value_cache=torch.zeros((4, 8, NUM_KV_HEADS, 16)),
        block_table=torch.zeros((2, 2), dtype=torch.int32),
        query_start_loc=torch.tensor([0, 3, 5], dtype=torch.int32),
        seq_lens=torch.tensor([3, 16], dtype=torch.int32),
        scale=0.25,
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(query=torch.zeros((5, 4, 16))), "multiple of num_kv_heads"),
        (lambda a: a.update(query=torch.zeros((5, NUM_HEADS, 8))), "head_dim"),
        (lambda a: a.update(query_start_loc=torch.tensor([0, 5], dtype=torch.int32)), "num_seqs \\+ 1"),
        (lambda a: a.update(query_start_loc=torch.tensor([0, 3, 4], dtype=torch.int32)), "num_tokens=5"),
        (lambda a: a.update(query_start_loc=torch.tensor([0, 3.0, 5])), "int32 or int64"),
        (lambda a: a.update(query_start_loc=torch.tensor([0, 6, 5], dtype=torch.int32)), "non-decreasing"),
        (lambda a: a.update(seq_lens=torch.tensor([2, 16], dtype=torch.int32)), "more new tokens"),
        (lambda a: a.update(seq_lens=torch.tensor([3, 17], dtype=torch.int32)), "capacity"),
        (lambda a: a.update(block_table=torch.zeros((1, 2), dtype=torch.int32)), "rows"),
        (lambda a: a.update(value_cache=torch.zeros((4, 8, NUM_KV_HEADS, 16)).half()), "dtype"),
    ],
)
def test_extend_rejects_bad_inputs(change, match):
    args = _extend_args()
    change(args)
    with pytest.raises(ValueError, match=match):
        kernels.paged_extend_attention(**args)


def test_extend_rejects_bad_tiles():
    with pytest.raises(ValueError, match="block_m"):
        kernels.paged_extend_attention(**_extend_args(), block_m=8)
    with pytest.raises(ValueError, match="block_n"):
        kernels.paged_extend_attention(**_extend_args(), block_n=48)
