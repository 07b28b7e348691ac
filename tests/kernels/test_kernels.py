"""Cache-write, decode, block-copy and swap kernels: Triton (under the interpreter) and torch twins
against references built without pages.

Every attention test builds each sequence's K/V as plain contiguous tensors first, scatters them
into a paged pool by hand (shuffled, non-contiguous block ids; every unused slot filled with NaN so
that a stray read poisons the result), and compares the kernels with dense float64 attention
computed from the contiguous tensors.
"""

import os

# Triton picks interpreter vs compiler when a kernel is decorated, i.e. when kernels' Triton modules
# are first imported: this must run before that (and is checked below).
os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402

if not kernels.triton_interpreted():
    raise RuntimeError(
        "kernels' Triton modules were imported before TRITON_INTERPRET=1 was set (another test module "
        "or conftest imported them first), so the kernels are compiled for a GPU and cannot run on CPU "
        "tensors. Set TRITON_INTERPRET=1 in the environment, or import kernels' Triton modules only here."
    )

from kernels._common import check_launchable  # noqa: E402
from kernels.block_copy import _swap_blocks_across  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 3, 64
ATOL = RTOL = 1e-5
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# References built without pages


def make_contexts(lengths, num_kv_heads, head_dim, gen, dtype=torch.float32):
    """Per sequence, contiguous ``[L, num_kv_heads, head_dim]`` keys and values."""
    return [
        (
            torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype),
            torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype),
        )
        for n in lengths
    ]


def page_contexts(contexts, block_size, gen, spare_blocks=3):
    """Scatter contiguous contexts into a NaN-filled pool through shuffled block ids.

    Returns ``key_cache, value_cache, block_table (int32), seq_lens (int32)``. Each row of the block
    table is padded with one extra column pointing at a never-written (all-NaN) block.
    """
    k0 = contexts[0][0]
    kvh, d, dtype = k0.shape[1], k0.shape[2], k0.dtype
    per_seq = [math.ceil(k.shape[0] / block_size) for k, _ in contexts]
    num_blocks = sum(per_seq) + spare_blocks
    key_cache = torch.full((num_blocks, block_size, kvh, d), float("nan"), dtype=dtype)
    value_cache = torch.full_like(key_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    poison = perm[-1]
    table = torch.full((len(contexts), max(per_seq) + 1), poison, dtype=torch.int32)
    used = 0
    for i, (k, v) in enumerate(contexts):
        for j in range(per_seq[i]):
            block = perm[used]
            used += 1
            table[i, j] = block
            rows = slice(j * block_size, min((j + 1) * block_size, k.shape[0]))
            n = rows.stop - rows.start
            key_cache[block, :n] = k[rows]
            value_cache[block, :n] = v[rows]
    seq_lens = torch.tensor([k.shape[0] for k, _ in contexts], dtype=torch.int32)
    return key_cache, value_cache, table, seq_lens


def dense_attention(q, k, v, scale):
    """Causal attention of ``q`` ``[Q, H, D]`` (the last Q positions) over contiguous ``k``, ``v``
    ``[L, KVH, D]``, in float64; query head ``h`` reads KV head ``h // (H // KVH)``."""
    num_q, num_heads = q.shape[0], q.shape[1]
    length, num_kv = k.shape[0], k.shape[1]
    kv_of_head = torch.arange(num_heads) // (num_heads // num_kv)
    kk = k.double()[:, kv_of_head]  # [L, H, D]
    vv = v.double()[:, kv_of_head]
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    q_pos = torch.arange(length - num_q, length)[:, None]
    visible = torch.arange(length)[None, :] <= q_pos  # [Q, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vv)


def dense_decode(query, contexts, scale):
    return torch.stack([dense_attention(query[i : i + 1], k, v, scale)[0] for i, (k, v) in enumerate(contexts)])


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def edge_lengths(block_size, gen, extra=2, max_len=90):
    return [1, block_size - 1, block_size, block_size + 1] + torch.randint(2, max_len, (extra,), generator=gen).tolist()


# ----------------------------------------------------------------------------------------------
# The harness itself


def test_interpreter_is_active():
    assert kernels.triton_interpreted()


def test_dense_reference_matches_plain_softmax():
    # The dense reference against an unrolled loop (decode, one head group), so it is not trusted blindly.
    gen = torch.Generator().manual_seed(1)
    k, v = make_contexts([5], 1, 4, gen)[0]
    q = torch.randn((1, 2, 4), generator=gen)
    out = dense_attention(q, k, v, 0.5)
    for h in range(2):
        w = [math.exp(0.5 * float(q[0, h] @ k[j, 0])) for j in range(5)]
        expected = sum(w[j] * v[j, 0].double() for j in range(5)) / sum(w)
        assert_close(out[0, h], expected)


def test_page_contexts_uses_shuffled_noncontiguous_blocks():
    gen = torch.Generator().manual_seed(2)
    contexts = make_contexts([40, 40, 40], NUM_KV_HEADS, 8, gen)
    _, _, table, _ = page_contexts(contexts, 8, gen)
    ids = table[:, :5].flatten()
    assert ids.unique().numel() == ids.numel()
    assert not torch.equal(ids, torch.arange(ids.numel(), dtype=ids.dtype))
    assert not torch.equal(ids.sort().values, ids)


# ----------------------------------------------------------------------------------------------
# write_kv_cache


@pytest.mark.parametrize("block_size", [16, 8])
def test_write_kv_cache_matches_manual_scatter_and_twin(block_size):
    gen = torch.Generator().manual_seed(10 + block_size)
    num_blocks, num_tokens = 7, 12
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, generator=gen)
    value_cache = torch.randn(shape, generator=gen)
    # Non-contiguous key/value: slices of a fused buffer, as a qkv projection would give.
    fused = torch.randn((num_tokens, 2, NUM_KV_HEADS, HEAD_DIM), generator=gen)
    key, value = fused[:, 0], fused[:, 1]
    assert not key.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 5, 11]] = torch.tensor([-1, -7, -1])  # padding tokens
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot // block_size, slot % block_size] = key[t]
            expected_v[slot // block_size, slot % block_size] = value[t]
    twin_k, twin_v = key_cache.clone(), value_cache.clone()

    kernels.write_kv_cache(key, value, key_cache, value_cache, slots)
    kernels.write_kv_cache_torch(key, value, twin_k, twin_v, slots)

    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)
    assert torch.equal(twin_k, expected_k) and torch.equal(twin_v, expected_v)


def test_write_kv_cache_int32_slots_and_empty():
    key_cache = torch.zeros((2, 4, 1, 16))
    value_cache = torch.zeros_like(key_cache)
    key = torch.ones((2, 1, 16))
    kernels.write_kv_cache(key, -key, key_cache, value_cache, torch.tensor([5, -1], dtype=torch.int32))
    assert torch.equal(key_cache[1, 1], key[0]) and torch.equal(value_cache[1, 1], -key[0])
    assert float(key_cache.abs().sum()) == 16.0
    kernels.write_kv_cache(key[:0], key[:0], key_cache, value_cache, torch.empty(0, dtype=torch.int64))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(key=a["key"][:, :2], value=a["value"][:, :2]), "num_kv_heads"),
        (lambda a: a.update(value=a["value"][:3]), "value shape"),
        (lambda a: a.update(value_cache=a["value_cache"][:, :8]), "value_cache shape"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"].float()), "int32 or int64"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"][:3]), "num_tokens"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"] + 1000), "out of range"),
        (lambda a: a.update(key=a["key"].double(), value=a["value"].double()), "dtype"),
    ],
)
def test_write_kv_cache_rejects_bad_inputs(change, match):
    args = dict(
        key=torch.zeros((4, NUM_KV_HEADS, 16)),
        value=torch.zeros((4, NUM_KV_HEADS, 16)),
        key_cache=torch.zeros((3, 16, NUM_KV_HEADS, 16)),
        value_cache=torch.zeros((3, 16, NUM_KV_HEADS, 16)),
        slot_mapping=torch.tensor([0, 1, -1, 40]),
    )
    change(args)
    with pytest.raises(ValueError, match=match):
        kernels.write_kv_cache(**args)


# ----------------------------------------------------------------------------------------------
# paged_decode_attention


@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("split_k", [False, True])
def test_decode_matches_dense(block_size, split_k):
    gen = torch.Generator().manual_seed(100 + block_size + split_k)
    lengths = edge_lengths(block_size, gen)
    contexts = make_contexts(lengths, NUM_KV_HEADS, HEAD_DIM, gen)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, block_size, gen)
    query = torch.randn((len(lengths), NUM_HEADS, HEAD_DIM), generator=gen)
    scale = HEAD_DIM**-0.5
    expected = dense_decode(query, contexts, scale)
    # Forced split-K with short partitions, so these short contexts span several of them.
    tuning = dict(partition_size=32, block_n=16) if split_k else {}

    out = kernels.paged_decode_attention(query, key_cache, value_cache, table, seq_lens, scale, split_k=split_k, **tuning)
    twin = kernels.paged_decode_attention_torch(query, key_cache, value_cache, table, seq_lens, scale)

    assert out.shape == query.shape and out.dtype == query.dtype
    assert_close(out, expected)
    assert_close(twin, expected)


def test_decode_long_context_split_and_single_pass():
    # One longer context spanning 3 default partitions (512 tokens), beside short ones.
    gen = torch.Generator().manual_seed(7)
    lengths = [1100, 33, 1]
    contexts = make_contexts(lengths, NUM_KV_HEADS, HEAD_DIM, gen)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, 16, gen)
    query = torch.randn((len(lengths), NUM_HEADS, HEAD_DIM), generator=gen)
    expected = dense_decode(query, contexts, 0.125)
    for split_k in (True, False, None):
        out = kernels.paged_decode_attention(query, key_cache, value_cache, table, seq_lens, 0.125, split_k=split_k)
        assert_close(out, expected)
    assert_close(kernels.paged_decode_attention_torch(query, key_cache, value_cache, table, seq_lens, 0.125), expected)


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, block_size",
    [(4, 4, 32, 16), (8, 1, 80, 8), (6, 2, 16, 4)],
    ids=["mha", "mqa-hd80", "gqa-bs4"],
)
def test_decode_other_shapes(num_heads, num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(num_heads * 100 + head_dim)
    lengths = edge_lengths(block_size, gen, extra=1, max_len=40)
    contexts = make_contexts(lengths, num_kv_heads, head_dim, gen)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, block_size, gen)
    query = torch.randn((len(lengths), num_heads, head_dim), generator=gen)
    expected = dense_decode(query, contexts, 0.3)
    for split_k in (False, True):
        out = kernels.paged_decode_attention(
            query, key_cache, value_cache, table, seq_lens, 0.3, split_k=split_k, partition_size=16, block_n=16
        )
        assert_close(out, expected)
    assert_close(kernels.paged_decode_attention_torch(query, key_cache, value_cache, table, seq_lens, 0.3), expected)


def test_decode_fp16():
    # (bfloat16 is not covered here: the Triton interpreter's tl.dot does not support it,
    # triton-lang/triton#11584; benchmarks/kernels_gpu.py checks bfloat16 on a GPU.)
    gen = torch.Generator().manual_seed(5)
    lengths = edge_lengths(16, gen)
    contexts = make_contexts(lengths, NUM_KV_HEADS, HEAD_DIM, gen, dtype=torch.float16)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, 16, gen)
    query = torch.randn((len(lengths), NUM_HEADS, HEAD_DIM), generator=gen).half()
    expected = dense_decode(query, contexts, HEAD_DIM**-0.5)
    for split_k in (False, True):
        out = kernels.paged_decode_attention(
            query, key_cache, value_cache, table, seq_lens, HEAD_DIM**-0.5, split_k=split_k, partition_size=32, block_n=16
        )
        assert out.dtype == torch.float16
        assert_close(out, expected, atol=2e-3, rtol=2e-3)


def test_decode_int64_indices_and_strided_query():
    gen = torch.Generator().manual_seed(6)
    lengths = [20, 3]
    contexts = make_contexts(lengths, NUM_KV_HEADS, HEAD_DIM, gen)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, 8, gen)
    fused = torch.randn((2, 2 * NUM_HEADS, HEAD_DIM), generator=gen)
    query = fused[:, ::2]  # non-contiguous head stride
    expected = dense_decode(query, contexts, 0.2)
    out = kernels.paged_decode_attention(query, key_cache, value_cache, table.long(), seq_lens.long(), 0.2)
    assert_close(out, expected)


def test_decode_split_k_with_host_max_seq_len():
    # max_seq_len (a host-side bound) sizes the split-K grid instead of the block table's capacity.
    gen = torch.Generator().manual_seed(12)
    lengths = [40, 17, 1]
    contexts = make_contexts(lengths, NUM_KV_HEADS, HEAD_DIM, gen)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, 8, gen)
    table = torch.cat([table, table[:, -1:].expand(-1, 20)], dim=1)  # a much wider, padded table
    query = torch.randn((len(lengths), NUM_HEADS, HEAD_DIM), generator=gen)
    out = kernels.paged_decode_attention(
        query, key_cache, value_cache, table, seq_lens, 0.125, split_k=True, max_seq_len=40, partition_size=16, block_n=16
    )
    assert_close(out, dense_decode(query, contexts, 0.125))


def test_import_kernels_does_not_import_triton():
    # The Triton modules load on first use, so importing kernels (as the executor does) never fixes
    # Triton's compile-or-interpret choice early.
    code = (
        "import sys, kernels; assert 'triton' not in sys.modules; "
        "kernels.paged_decode_attention; assert 'kernels.decode_attention' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


def test_decode_zero_length_sequence_gives_zeros():
    gen = torch.Generator().manual_seed(8)
    contexts = make_contexts([5, 9], NUM_KV_HEADS, HEAD_DIM, gen)
    key_cache, value_cache, table, _ = page_contexts(contexts, 8, gen)
    seq_lens = torch.tensor([5, 0], dtype=torch.int32)
    query = torch.randn((2, NUM_HEADS, HEAD_DIM), generator=gen)
    for split_k in (False, True):
        out = kernels.paged_decode_attention(query, key_cache, value_cache, table, seq_lens, 0.2, split_k=split_k)
        assert_close(out[0], dense_decode(query[:1], contexts[:1], 0.2)[0])
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_write_then_decode_pipeline():
    # Tokens written with the Triton cache-write kernel, then read back by the decode kernel.
    gen = torch.Generator().manual_seed(9)
    block_size, lengths = 8, [1, 7, 8, 9, 30]
    contexts = make_contexts(lengths, NUM_KV_HEADS, HEAD_DIM, gen)
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 2
    key_cache = torch.full((num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros((len(lengths), 5), dtype=torch.int32)
    slots, used = [], 0
    for i, n in enumerate(lengths):
        nb = math.ceil(n / block_size)
        table[i, :nb] = perm[used : used + nb]
        used += nb
        slots += [int(table[i, p // block_size]) * block_size + p % block_size for p in range(n)]
    key = torch.cat([k for k, _ in contexts])
    value = torch.cat([v for _, v in contexts])
    kernels.write_kv_cache(key, value, key_cache, value_cache, torch.tensor(slots))
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    query = torch.randn((len(lengths), NUM_HEADS, HEAD_DIM), generator=gen)
    out = kernels.paged_decode_attention(query, key_cache, value_cache, table, seq_lens, 0.125)
    assert_close(out, dense_decode(query, contexts, 0.125))


def test_decode_comparison_can_fail():
    # The same comparison as above must notice a wrong cache entry or a wrong block table.
    gen = torch.Generator().manual_seed(11)
    contexts = make_contexts([20, 20], NUM_KV_HEADS, HEAD_DIM, gen)
    key_cache, value_cache, table, seq_lens = page_contexts(contexts, 8, gen)
    query = torch.randn((2, NUM_HEADS, HEAD_DIM), generator=gen)
    expected = dense_decode(query, contexts, 0.125)
    corrupted = value_cache.clone()
    corrupted[int(table[0, 1]), 3, 1] += 1.0
    out = kernels.paged_decode_attention(query, key_cache, corrupted, table, seq_lens, 0.125)
    with pytest.raises(AssertionError):
        assert_close(out, expected)
    # (Permuting a sequence's own full blocks would not change decode output: keys are a set.)
    wrong = table.clone()
    wrong[0, 0] = table[1, 0]
    out = kernels.paged_decode_attention(query, key_cache, value_cache, wrong, seq_lens, 0.125)
    with pytest.raises(AssertionError):
        assert_close(out, expected)


def test_split_k_heuristic():
    # 132 SMs assumed off-GPU: split while num_seqs * num_kv_heads < 4 * 132 and context >= 1024.
    assert kernels.use_split_k(1, 3, 32768, "cpu")
    assert kernels.use_split_k(1, 3, 1024, "cpu")
    assert not kernels.use_split_k(1, 3, 1023, "cpu")
    assert not kernels.use_split_k(1, 3, 128, "cpu")
    assert kernels.use_split_k(175, 3, 4096, "cpu")
    assert not kernels.use_split_k(176, 3, 4096, "cpu")
    assert not kernels.use_split_k(256, 3, 32768, "cpu")


def _decode_args():
    return dict(
        query=torch.zeros((2, NUM_HEADS, 16)),
        key_cache=torch.zeros((4, 8, NUM_KV_HEADS, 16)),
        value_cache=torch.zeros((4, 8, NUM_KV_HEADS, 16)),
        block_table=torch.zeros((2, 2), dtype=torch.int32),
        seq_lens=torch.tensor([3, 16], dtype=torch.int32),
        scale=0.25,
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(query=torch.zeros((2, 8, 16))), "multiple of num_kv_heads"),
        (lambda a: a.update(query=torch.zeros((2, NUM_HEADS, 32))), "head_dim"),
        (lambda a: a.update(query=torch.zeros((2, NUM_HEADS))), "3-D"),
        (lambda a: a.update(value_cache=torch.zeros((4, 8, 1, 16))), "value_cache shape"),
        (lambda a: a.update(key_cache=torch.zeros((4, 8, NUM_KV_HEADS))), "4-D"),
        (lambda a: a.update(block_table=torch.zeros((3, 2), dtype=torch.int32)), "rows"),
        (lambda a: a.update(block_table=torch.zeros((2, 2))), "int32 or int64"),
        (lambda a: a.update(seq_lens=torch.tensor([3], dtype=torch.int32)), "num_seqs"),
        (lambda a: a.update(seq_lens=torch.tensor([3, 17], dtype=torch.int32)), "capacity"),
        (lambda a: a.update(query=torch.zeros((2, NUM_HEADS, 16), dtype=torch.float64)), "dtype"),
    ],
)
def test_decode_rejects_bad_inputs(change, match):
    args = _decode_args()
    change(args)
    with pytest.raises(ValueError, match=match):
        kernels.paged_decode_attention(**args)


def test_decode_rejects_bad_tuning():
    with pytest.raises(ValueError, match="block_n"):
        kernels.paged_decode_attention(**_decode_args(), block_n=24)
    with pytest.raises(ValueError, match="partition_size"):
        kernels.paged_decode_attention(**_decode_args(), split_k=True, partition_size=40, block_n=16)


def test_cpu_tensors_need_the_interpreter():
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        check_launchable(object(), "paged_decode_attention", torch.zeros(1))
    with pytest.raises(ValueError, match="one device"):
        check_launchable(object(), "x", torch.zeros(1), torch.zeros(1, device="meta"))


# ----------------------------------------------------------------------------------------------
# copy_blocks / swap_blocks


@pytest.mark.parametrize("block_size", [16, 8])
def test_copy_blocks_matches_manual_and_twin(block_size):
    gen = torch.Generator().manual_seed(20 + block_size)
    shape = (10, block_size, NUM_KV_HEADS, HEAD_DIM)
    key_caches = [torch.randn(shape, generator=gen) for _ in range(2)]
    value_caches = [torch.randn(shape, generator=gen) for _ in range(2)]
    mapping = torch.tensor([[1, 7], [4, 2], [1, 9]])  # one source copied twice (fork)
    expected = [c.clone() for c in (*key_caches, *value_caches)]
    for cache in expected:
        for src, dst in mapping.tolist():
            cache[dst] = cache[src]
    twin_k = [c.clone() for c in key_caches]
    twin_v = [c.clone() for c in value_caches]

    kernels.copy_blocks(key_caches, value_caches, mapping)
    kernels.copy_blocks_torch(twin_k, twin_v, mapping)

    for actual, twin, exp in zip((*key_caches, *value_caches), (*twin_k, *twin_v), expected):
        assert torch.equal(actual, exp)
        assert torch.equal(twin, exp)


def test_copy_blocks_int32_mapping_and_empty():
    caches = [torch.arange(4 * 2 * 1 * 4, dtype=torch.float32).view(4, 2, 1, 4)]
    values = [-caches[0].clone()]
    before = caches[0].clone()
    kernels.copy_blocks(caches, values, torch.empty((0, 2), dtype=torch.int64))
    assert torch.equal(caches[0], before)
    kernels.copy_blocks(caches, values, torch.tensor([[0, 3]], dtype=torch.int32))
    assert torch.equal(caches[0][3], before[0]) and torch.equal(values[0][3], -before[0])
    assert torch.equal(caches[0][:3], before[:3])


@pytest.mark.parametrize(
    "mapping, match",
    [
        ([[0, 1], [1, 2]], "both source and destination"),
        ([[0, 2], [1, 2]], "more than once"),
        ([[0, 4]], "out of range"),
        ([[-1, 2]], "out of range"),
    ],
)
def test_copy_blocks_rejects_bad_mappings(mapping, match):
    caches = [torch.zeros((4, 2, 1, 4))]
    with pytest.raises(ValueError, match=match):
        kernels.copy_blocks(caches, [torch.zeros((4, 2, 1, 4))], torch.tensor(mapping))


def test_copy_blocks_rejects_bad_caches():
    with pytest.raises(ValueError, match="value caches"):
        kernels.copy_blocks([torch.zeros((4, 2, 1, 4))], [], torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.copy_blocks([torch.zeros((4, 4, 1, 2)).transpose(1, 3)], [torch.zeros((4, 2, 1, 4))], torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="number of blocks"):
        kernels.copy_blocks([torch.zeros((4, 2, 1, 4))], [torch.zeros((5, 2, 1, 4))], torch.tensor([[0, 1]]))


@pytest.mark.parametrize("path", ["triton", "across-devices"])
def test_swap_blocks_matches_manual_and_twin(path):
    gen = torch.Generator().manual_seed(30)
    src = torch.randn((12, 8, NUM_KV_HEADS, HEAD_DIM), generator=gen)
    dst = torch.randn((5, 8, NUM_KV_HEADS, HEAD_DIM), generator=gen)  # a smaller (CPU) pool
    mapping = torch.tensor([[11, 0], [3, 4], [7, 2]])
    expected = dst.clone()
    for s, d in mapping.tolist():
        expected[d] = src[s]
    twin = dst.clone()
    if path == "triton":
        kernels.swap_blocks(src, dst, mapping)
    else:  # the torch path used between devices, exercised here on one device
        _swap_blocks_across(src, dst, mapping)
    kernels.swap_blocks_torch(src, twin, mapping)
    assert torch.equal(dst, expected)
    assert torch.equal(twin, expected)


def test_swap_blocks_rejects_bad_inputs():
    a = torch.zeros((4, 2, 1, 4))
    with pytest.raises(ValueError, match="block shapes"):
        kernels.swap_blocks(a, torch.zeros((4, 4, 1, 2)), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="dtypes"):
        kernels.swap_blocks(a, a.double(), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="out of range"):
        kernels.swap_blocks(a, torch.zeros((2, 2, 1, 4)), torch.tensor([[3, 2]]))
    with pytest.raises(ValueError, match=r"\[num_pairs, 2\]"):
        kernels.swap_blocks(a, a.clone(), torch.tensor([[0, 1, 2]]))


# ----------------------------------------------------------------------------------------------
# The GPU script's non-GPU parts


def _run_script(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # behave as on a machine without a GPU
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernels_gpu.py"), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_gpu_script_without_cuda_exits_2():
    result = _run_script()
    assert result.returncode == 2, result.stderr
    assert "no CUDA device" in result.stderr


def test_gpu_script_dry_run_on_cpu():
    result = _run_script("--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checks: all passed" in result.stdout
    assert "FAIL" not in result.stdout
    assert "decode bandwidth" in result.stdout and "prefill (extend)" in result.stdout
