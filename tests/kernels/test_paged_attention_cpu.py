"""kernels.paged_attention_cpu: one compiled call per layer writes the step's K/V and attends.

Against float64 dense causal attention over contiguous K/V (prefill, chunked prefill, prefix hits,
decode, GQA/MHA/MQA, odd block sizes, padding), and for bits: a token's output is the same alone,
in batches of any size and order, in any prefill chunk, with 1 to 3 threads and on every x86-64
level. The paged pool is NaN everywhere the sequences do not own, so a stray read poisons outputs.
"""

import hashlib
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import paged_attention_cpu as pa
from kernels.paged_attention_cpu import StepLayout, paged_attention_cpu

pytestmark = pytest.mark.skipif(pa.backend() != "compiled",
                                reason="no compiled CPU attention here (no C compiler, or an x86 CPU without FMA)")

SCALE = 0.125


class Batch:
    """Sequences with ``cached`` tokens already in a NaN-filled pool and ``new`` tokens to add.

    Each sequence's K/V and queries are drawn as contiguous tensors; the cached prefix is scattered
    through shuffled block ids, and the new tokens' K/V are left for the kernel to write. ``blocked``
    holds the caches in the kernel's layout; ``key_cache`` / ``value_cache`` are views of them in
    the ``[num_blocks, block_size, num_kv_heads, head_dim]`` layout (``pa.standard_views``).
    """

    def __init__(self, pairs, block_size=16, heads=(9, 3), head_dim=64, seed=0, spare_blocks=3, draw=None):
        gen = torch.Generator().manual_seed(seed)
        draw = draw or (lambda *shape: torch.randn(*shape, generator=gen))
        self.pairs, self.block_size = pairs, block_size
        self.num_heads, self.num_kv_heads = heads
        lens = [c + n for c, n in pairs]
        self.k = [draw(n, self.num_kv_heads, head_dim) for n in lens]
        self.v = [draw(n, self.num_kv_heads, head_dim) for n in lens]
        self.q = [draw(n, self.num_heads, head_dim) for n in lens]
        per_seq = [math.ceil(n / block_size) for n in lens]
        num_blocks = sum(per_seq) + spare_blocks
        shapes = pa.cache_shapes(num_blocks, block_size, self.num_kv_heads, head_dim)
        self.blocked = tuple(torch.full(shape, float("nan")) for shape in shapes)
        self.key_cache, self.value_cache = pa.standard_views(*self.blocked)
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        # Entries past a sequence's own blocks: a spare (NaN) block, never to be read.
        self.table = torch.full((len(pairs), max(per_seq, default=0) + 2), perm[-1], dtype=torch.int32)
        used = 0
        for i, (cached, _) in enumerate(pairs):
            for j in range(per_seq[i]):
                self.table[i, j] = perm[used]
                used += 1
            self._scatter(i, 0, cached)

    def _scatter(self, i, start, stop):
        bs = self.block_size
        for p in range(start, stop):
            block = int(self.table[i, p // bs])
            self.key_cache[block, p % bs] = self.k[i][p]
            self.value_cache[block, p % bs] = self.v[i][p]

    def step(self, seqs=None, new=None):
        """Arguments of one kernel call for ``seqs`` (default all), adding ``new[i]`` tokens each
        (default the pair's). Returns ``(query, key, value, layout)``."""
        seqs = list(range(len(self.pairs))) if seqs is None else seqs
        qs, ks, vs, slots, starts, lens = [], [], [], [], [0], []
        for n, i in enumerate(seqs):
            cached = self.pairs[i][0]
            count = self.pairs[i][1] if new is None else new[n]
            span = slice(cached, cached + count)
            qs.append(self.q[i][span])
            ks.append(self.k[i][span])
            vs.append(self.v[i][span])
            slots += [int(self.table[i, p // self.block_size]) * self.block_size + p % self.block_size
                      for p in range(cached, cached + count)]
            starts.append(starts[-1] + count)
            lens.append(cached + count)
        layout = StepLayout(torch.tensor(slots, dtype=torch.int64), self.table[seqs],
                            torch.tensor(starts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32))
        return torch.cat(qs), torch.cat(ks), torch.cat(vs), layout

    def run(self, seqs=None, new=None, **kw):
        query, key, value, layout = self.step(seqs, new)
        return paged_attention_cpu(query, key, value, *self.blocked, layout, SCALE, **kw)

    def dense(self, i, start, stop):
        """float64 causal attention of sequence i's tokens start .. stop-1 over its keys 0 .. stop-1."""
        group = self.num_heads // self.num_kv_heads
        q = self.q[i][start:stop].double()
        k = self.k[i][:stop].double().repeat_interleave(group, dim=1)
        v = self.v[i][:stop].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
        visible = torch.arange(stop)[None, :] <= torch.arange(start, stop)[:, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        return torch.einsum("hqk,khd->qhd", probs, v)


#: (cached tokens, new tokens): a prefill, single tokens (decode), prefix hits and chunks around
#: block and 64-key chunk boundaries, a sequence with no new tokens, a long prefill over many chunks.
PAIRS = [(0, 37), (40, 1), (0, 1), (15, 5), (16, 17), (33, 31), (9, 0), (63, 1), (64, 1), (127, 2), (0, 200),
         (100, 70)]


@pytest.mark.parametrize("block_size", [16, 8, 5, 1, 64])
def test_matches_dense_attention_and_writes_the_cache(block_size):
    batch = Batch(PAIRS, block_size=block_size, seed=block_size)
    out = batch.run()
    start = 0
    for i, (cached, new) in enumerate(PAIRS):
        torch.testing.assert_close(out[start : start + new].double(), batch.dense(i, cached, cached + new),
                                   rtol=1e-5, atol=1e-5)
        start += new
    for i, (cached, new) in enumerate(PAIRS):  # every new token's K/V is in its slot now
        for p in range(cached, cached + new):
            block = int(batch.table[i, p // block_size])
            assert torch.equal(batch.key_cache[block, p % block_size], batch.k[i][p])
            assert torch.equal(batch.value_cache[block, p % block_size], batch.v[i][p])


@pytest.mark.parametrize("heads, head_dim", [((4, 4), 64), ((8, 1), 80), ((6, 2), 32), ((2, 1), 16), ((80, 1), 8),
                                             ((3, 3), 5)],
                         ids=["mha", "mqa-d80", "gqa-d32", "d16", "group80-d8", "d5"])
def test_other_head_shapes(heads, head_dim):
    pairs = [(0, 70), (50, 1), (130, 3)]
    batch = Batch(pairs, block_size=16, heads=heads, head_dim=head_dim)
    out = batch.run()
    expected = torch.cat([batch.dense(i, c, c + n) for i, (c, n) in enumerate(pairs)])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_strided_inputs_are_read_in_place():
    """query / key / value as slices of one fused projection, as the model passes them."""
    batch = Batch([(20, 30), (0, 5)])
    query, key, value, layout = batch.step()
    fused = torch.cat([query, key, value], dim=1)  # [T, 9 + 3 + 3, 64]
    q, k, v = fused.split([9, 3, 3], dim=1)
    assert not q.is_contiguous()
    expected = batch.run()
    batch2 = Batch([(20, 30), (0, 5)])
    got = paged_attention_cpu(q, k, v, *batch2.blocked, layout, SCALE)
    assert torch.equal(got, expected)


def test_padding_slots_and_tokens():
    """Tokens with a negative slot are not written; tokens past query_start_loc[-1] get zeros."""
    batch = Batch([(10, 4)])
    query, key, value, layout = batch.step()
    pad = 2
    query = torch.cat([query, torch.randn(pad, 9, 64)])
    key, value = torch.cat([key, torch.randn(pad, 3, 64)]), torch.cat([value, torch.randn(pad, 3, 64)])
    padded = StepLayout(torch.cat([layout.slot_mapping, torch.full((pad,), -1)]), layout.block_table,
                        layout.query_start_loc, layout.seq_lens)
    before = batch.key_cache.clone()
    out = paged_attention_cpu(query, key, value, *batch.blocked, padded, SCALE)
    torch.testing.assert_close(out[:4].double(), batch.dense(0, 10, 14), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[4:], torch.zeros(pad, 9, 64))
    changed = ~(batch.key_cache == before) & ~(before.isnan() & batch.key_cache.isnan())
    assert int(changed.any(-1).any(-1).sum()) == 4  # the 4 real tokens' rows only


def _round_to_bf16(batch):
    """Every value of the batch (queries, K/V, the cached prefix) made exactly representable in bf16."""
    for t in (*batch.q, *batch.k, *batch.v, batch.key_cache, batch.value_cache):
        t.copy_(t.bfloat16().float())


@pytest.mark.parametrize("block_size", [16, 5])
def test_bf16_gives_the_fp32_outputs_rounded_once(block_size):
    """bf16 tensors: the fp32 arithmetic on the values widened exactly, one rounding at the output;
    the new K/V land in the bf16 cache as they came. Inputs are slices of one fused projection."""
    batch = Batch(PAIRS, block_size=block_size, seed=21)
    _round_to_bf16(batch)
    key_cache, value_cache = (t.bfloat16() for t in batch.blocked)
    query, key, value, layout = batch.step()
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[2]
    fused = torch.cat([query.flatten(1), key.flatten(1), value.flatten(1)], 1).bfloat16()
    q16 = fused[:, : heads * dim].view(-1, heads, dim)
    k16 = fused[:, heads * dim : (heads + kv_heads) * dim].view(-1, kv_heads, dim)
    v16 = fused[:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim)
    got = paged_attention_cpu(q16, k16, v16, key_cache, value_cache, layout, SCALE)
    expected = batch.run()  # fp32, writes the fp32 cache
    assert got.dtype is torch.bfloat16
    assert torch.equal(got, expected.bfloat16())
    assert torch.equal(key_cache.float().nan_to_num(7.0), batch.blocked[0].nan_to_num(7.0))
    assert torch.equal(value_cache.float().nan_to_num(7.0), batch.blocked[1].nan_to_num(7.0))


def test_empty_step():
    batch = Batch([(5, 0)])
    assert batch.run().shape == (0, 9, 64)


def test_a_token_has_the_same_bits_in_any_batch():
    pairs = [(0, 150), (70, 1), (200, 1), (31, 1), (0, 40), (64, 65)]
    full = Batch(pairs, seed=7)
    together = full.run()
    starts = [0]
    for _, n in pairs:
        starts.append(starts[-1] + n)
    # Each sequence alone, and in other batches, orders and sizes.
    for i in range(len(pairs)):
        alone = Batch(pairs, seed=7).run([i])
        assert torch.equal(alone, together[starts[i] : starts[i + 1]]), i
    for order in ([5, 1, 3], [3, 2, 1, 0], [2, 4]):
        got = Batch(pairs, seed=7).run(order)
        expected = torch.cat([together[starts[i] : starts[i + 1]] for i in order])
        assert torch.equal(got, expected), order


@pytest.mark.parametrize("block_size", [16, 5])
def test_chunked_prefill_and_decode_give_the_prefill_bits(block_size):
    """A prompt prefilled whole = cut into chunks at any offset = its tokens decoded one by one."""
    length = 300
    whole = Batch([(0, length)], block_size=block_size, seed=3).run()
    for cut in (1, 63, 64, 65, 129, 299):
        chunked = Batch([(0, length)], block_size=block_size, seed=3)
        chunked.pairs = [(0, cut)]
        first = chunked.run()
        chunked.pairs = [(cut, length - cut)]
        second = chunked.run()
        assert torch.equal(torch.cat([first, second]), whole), cut
    for pos in (0, 1, 63, 64, 200, 299):
        decode = Batch([(0, length)], block_size=block_size, seed=3)
        decode._scatter(0, 0, pos)  # the prefix, cached
        decode.pairs = [(pos, 1)]
        assert torch.equal(decode.run(), whole[pos : pos + 1]), pos


def test_threads_change_no_bits():
    pairs = [(0, 300), (500, 1), (40, 90), (1000, 1), (250, 1)] + [(i * 37, 1) for i in range(1, 20)]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(Batch(pairs, seed=11).run())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


#: sha256 of the outputs of :func:`_pinned_outputs`, fp32 then bf16. The kernel promises the same bits on
#: every x86-64 CPU, level and thread count, so these hold anywhere; a change that reorders any sum
#: or product changes them (and every cached greedy answer with them): only then update them.
PINNED_SHA256 = ("9614f47417ed4b410c1e09c929e235bca5ab8fa0d78b44d097b13c0eaddb4836",
                 "a1b7dc78030d844fa6621e90004c98981e0c5a807b495420034cf347e7ab1332")


def _pinned_outputs(dtype):
    """Outputs for inputs every machine draws alike: integers from torch's generator, scaled exactly.
    Wide ones (24 bits): with few bits every product and sum would be exact, and a reordered sum
    would give the same bits."""
    gen = torch.Generator().manual_seed(1234)

    def draw(*shape):
        return torch.randint(-2**23, 2**23, shape, generator=gen, dtype=torch.int32).float() / 2**21

    batch = Batch(PAIRS, block_size=16, draw=draw)
    if dtype is torch.bfloat16:
        _round_to_bf16(batch)
    query, key, value, layout = batch.step()
    caches = tuple(c.to(dtype) for c in batch.blocked)
    return paged_attention_cpu(query.to(dtype), key.to(dtype), value.to(dtype), *caches, layout, SCALE)


def test_the_bits_are_pinned():
    digests = tuple(hashlib.sha256(_pinned_outputs(dt).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                    for dt in (torch.float32, torch.bfloat16))
    assert digests == PINNED_SHA256


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction-set levels only")
def test_every_instruction_set_level_gives_the_same_bits(tmp_path):
    """Builds for plain x86-64 (fmaf in libm), x86-64-v3 (AVX2+FMA) and, where the CPU has AVX-512,
    x86-64-v4 give the process's bits: every operation is fmaf or exactly rounded."""
    levels = ["x86-64", "x86-64-v3"] + (["x86-64-v4"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])
    pairs = [(0, 70), (100, 1), (30, 5)]
    expected = Batch(pairs).run()
    for level in levels:
        lib = pa.load_library(pa.compile_kernel(tmp_path, ("-DPAGED_ATTENTION_NO_CLONES", f"-march={level}")))
        assert torch.equal(Batch(pairs).run(library=lib), expected), level


def _bad(change):
    batch = Batch([(20, 3), (0, 4)])
    query, key, value, layout = batch.step()
    slots, table, starts, lens = (t.clone() for t in (layout.slot_mapping, layout.block_table,
                                                      layout.query_start_loc, layout.seq_lens))
    change(slots, table, starts, lens)
    return batch, query, key, value, StepLayout(slots, table, starts, lens)


def _set(t, i, value):
    t[i] = value


@pytest.mark.parametrize("change, match", [
    (lambda s, t, q, n: _set(s, 1, 10**6), r"slot_mapping\[1\] is past the end"),
    (lambda s, t, q, n: _set(t, (1, 0), 10**6), "block_table row 1 holds a block id outside"),
    (lambda s, t, q, n: _set(t, (0, 1), -3), "block_table row 0 holds a block id outside"),
    (lambda s, t, q, n: _set(n, 0, 2), r"seq_lens\[0\] is below its query length"),
    (lambda s, t, q, n: _set(n, 1, 10**5), r"seq_lens\[1\] is below its query length or beyond"),
    (lambda s, t, q, n: _set(q, 1, 9), "query_start_loc must start at 0, not decrease"),
    (lambda s, t, q, n: _set(q, 0, 1), "query_start_loc must start at 0"),
])
def test_bad_layout_entries_raise_before_writing(change, match):
    batch, query, key, value, layout = _bad(change)
    before = batch.key_cache.clone()
    with pytest.raises(ValueError, match=match):
        paged_attention_cpu(query, key, value, *batch.blocked, layout, SCALE)
    assert torch.equal(batch.key_cache.isnan(), before.isnan())


def test_bad_tensors_raise():
    batch = Batch([(20, 3)])
    query, key, value, layout = batch.step()
    kc, vc = batch.blocked
    with pytest.raises(ValueError, match="shapes do not match"):
        paged_attention_cpu(query[:2], key, value, kc, vc, layout, SCALE)
    with pytest.raises(ValueError, match="shapes do not match.*cache_shapes"):  # the Triton kernels' layout
        paged_attention_cpu(query, key, value, batch.key_cache.contiguous(), batch.value_cache.contiguous(),
                            layout, SCALE)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention_cpu(query[:, :8], key, value, kc, vc, layout, SCALE)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        paged_attention_cpu(query.double(), key, value, kc, vc, layout, SCALE)
    with pytest.raises(ValueError, match="one dtype"):
        paged_attention_cpu(query.bfloat16(), key.bfloat16(), value.bfloat16(), kc, vc, layout, SCALE)
    with pytest.raises(ValueError, match="stride 1"):
        paged_attention_cpu(query.transpose(1, 2).contiguous().transpose(1, 2), key, value, kc, vc, layout, SCALE)
    with pytest.raises(ValueError, match="num_seqs"):
        StepLayout(layout.slot_mapping, layout.block_table, layout.query_start_loc[:1], layout.seq_lens)
    with pytest.raises(ValueError, match="int32/int64"):
        StepLayout(layout.slot_mapping.float(), layout.block_table, layout.query_start_loc, layout.seq_lens)


def test_the_comparison_can_fail():
    """A wrong block id in the table makes the output differ from dense attention (or NaN)."""
    batch = Batch([(40, 2)])
    batch.table[0, 1] = batch.table[0, 0]
    out = batch.run()
    assert not torch.allclose(out.double(), batch.dense(0, 40, 42), rtol=1e-5, atol=1e-5)


def test_without_a_compiler_the_torch_path_runs(tmp_path):
    """No C compiler: a warning, the plain-torch path in the executor's dispatch, or an error if the
    compiled kernel was asked for."""
    child = (
        "import logging, os, torch\n"
        "logging.basicConfig()\n"
        "from kernels import paged_attention_cpu as m\n"
        "from executor.attention import AttentionMetadata, paged_attention\n"
        "print(m.backend())\n"
        "meta = AttentionMetadata(torch.tensor([0]), torch.tensor([[0]], dtype=torch.int32),\n"
        "                         torch.tensor([1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 1)\n"
        "cache = torch.zeros(2, 4, 1, 8)\n"
        "one = torch.ones(1, 1, 8)\n"
        "paged_attention(torch.ones(1, 2, 8), one, one, cache, cache.clone(), meta, 1.0)\n"
        "print(type(meta.torch_plan).__name__)\n"
        "os.environ['PAGEDSERVE_CPU_ATTENTION'] = 'compiled'\n"
        "m._library.cache_clear()\n"
        "try:\n"
        "    m.backend()\n"
        "except OSError as exc:\n"
        "    print('error:', exc)\n"
    )
    env = {**os.environ, "CC": "no-such-cc-xyz", "PAGEDSERVE_KERNEL_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("PAGEDSERVE_CPU_ATTENTION", None)
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["torch", "ExtendAttentionPlan", "error: no C compiler 'no-such-cc-xyz' on PATH"]
    assert "paged_attention_cpu: C kernel unavailable" in proc.stderr and "plain-torch attention" in proc.stderr


def test_the_environment_forces_the_torch_path(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CPU_ATTENTION", "torch")
    pa._library.cache_clear()
    try:
        assert pa.backend() == "torch"
        monkeypatch.setenv("PAGEDSERVE_CPU_ATTENTION", "fast")
        pa._library.cache_clear()
        with pytest.raises(ValueError, match="PAGEDSERVE_CPU_ATTENTION must be"):
            pa.backend()
    finally:
        monkeypatch.delenv("PAGEDSERVE_CPU_ATTENTION")
        pa._library.cache_clear()
    assert pa.backend() == "compiled"


@pytest.mark.parametrize("dtype, plan", [(torch.float32, "StepLayout"), (torch.bfloat16, "StepLayout"),
                                         (torch.float16, "ExtendAttentionPlan")])
def test_the_executor_dispatch_runs_the_kernel_for_fp32_and_bf16_caches(dtype, plan):
    from executor.attention import AttentionMetadata, paged_attention

    batch = Batch([(20, 3), (40, 1)])
    query, key, value, layout = batch.step()
    meta = AttentionMetadata(layout.slot_mapping, layout.block_table, layout.seq_lens, layout.query_start_loc, 3)
    if plan == "StepLayout":  # the compiled kernel's layout; the torch twins read the standard one
        kc, vc = (t.to(dtype) for t in batch.blocked)
    else:
        kc, vc = batch.key_cache.to(dtype).contiguous(), batch.value_cache.to(dtype).contiguous()
    out = paged_attention(query.to(dtype), key.to(dtype), value.to(dtype), kc, vc, meta, SCALE)
    assert type(meta.torch_plan).__name__ == plan
    expected = torch.cat([batch.dense(0, 20, 23), batch.dense(1, 40, 41)])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
