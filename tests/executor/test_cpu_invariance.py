"""The CPU path's building blocks give each row / token the same bits whatever the batch.

These are the properties tests/executor/test_batch_invariance.py relies on end to end, checked here on
random tensors in a fraction of a second each (fp32, the test session's one thread);
tests/executor/test_cpu_paths.py runs this file again on each MKL / oneDNN code path the CPU has.
"""

import pytest
import torch

from executor.attention import AttentionMetadata, allocate_kv_cache, paged_attention, standard_kv_views
from executor.layers import RMSNorm
from executor.linear import Linear
from kernels import paged_attention_cpu
from kernels.paged_attention_cpu import StepLayout
from kernels.torch_ref import ExtendAttentionPlan, key_chunk_size, paged_extend_attention_torch

SMOLLM_LINEARS = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


# The checks assume one intra-op thread (see docs/batch-invariance.md), whatever ran before.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("in_f, out_f", SMOLLM_LINEARS + [(896, 1152)])
def test_linear_rows_do_not_depend_on_the_batch(in_f, out_f):
    gen = torch.Generator().manual_seed(in_f + out_f)
    lin = Linear(in_f, out_f, bias=out_f == 1152)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.05)
    x = torch.randn(70, in_f, generator=gen)
    with torch.inference_mode():
        full = lin(x)
        for rows in (1, 2, 3, 7, 15, 16, 17, 33):
            assert torch.equal(lin(x[:rows]), full[:rows]), rows
        assert torch.equal(lin(x[40:41]), full[40:41])
        perm = torch.randperm(70, generator=gen)
        assert torch.equal(lin(x[perm]), full[perm])
        torch.testing.assert_close(full, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_linear_repacks_when_the_weight_changes():
    lin = Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        before = lin(x)
    with torch.no_grad():
        lin.weight.mul_(2)
    with torch.inference_mode():
        assert torch.allclose(lin(x), 2 * before, atol=1e-6)


def test_rmsnorm_fast_path_is_the_hf_formula():
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    x = torch.randn(9, 576)
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(norm(x), expected)
    assert torch.equal(norm(x[4:5]), expected[4:5])


def test_rmsnorm_rows_do_not_depend_on_the_batch():
    norm = RMSNorm(576, 1e-5)
    x = torch.randn(300, 576, generator=torch.Generator().manual_seed(3))
    full = norm(x)
    for rows in (slice(0, 1), slice(7, 8), slice(0, 2), slice(5, 20), slice(299, 300)):
        assert torch.equal(norm(x[rows]), full[rows]), rows


def _paged(num_blocks=300, block_size=16, kvh=3, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, block_size, kvh, d, generator=gen)
    v = torch.randn(num_blocks, block_size, kvh, d, generator=gen)
    return k, v, gen


def _attend(q, k, v, table, q_lens, seq_lens):
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return paged_extend_attention_torch(q, k, v, table, qsl, torch.tensor(seq_lens, dtype=torch.int32), 0.125)


@pytest.mark.parametrize("block_size", [16, 8, 32])
def test_attention_is_the_same_in_any_split(block_size):
    k, v, gen = _paged(block_size=block_size)
    length = 300
    table = torch.randperm(k.shape[0], generator=gen)[: -(-length // block_size)].view(1, -1).int()
    q = torch.randn(length, 9, 64, generator=gen)
    full = _attend(q, k, v, table, [length], [length])
    for cut in (1, 63, 64, 65, 129, 299):  # chunked prefill: two calls
        a = _attend(q[:cut], k, v, table, [cut], [cut])
        b = _attend(q[cut:], k, v, table, [length - cut], [length])
        assert torch.equal(torch.cat([a, b]), full), cut
    # Decodes, alone and batched with other sequences' decodes and a prefill chunk.
    for pos in (0, 63, 64, 200, 299):
        assert torch.equal(_attend(q[pos : pos + 1], k, v, table, [1], [pos + 1]), full[pos : pos + 1])
    positions = [5, 130, 131, 299]
    mixed = _attend(torch.cat([q[100:140], q[positions]]), k, v, table.expand(5, -1), [40, 1, 1, 1, 1],
                    [140] + [p + 1 for p in positions])
    assert torch.equal(mixed, torch.cat([full[100:140], full[positions]]))


def test_attention_ignores_stale_and_nan_cache_entries():
    k, v, gen = _paged()
    table = torch.tensor([[3, 7, 9, 11]], dtype=torch.int32)
    q = torch.randn(1, 9, 64, generator=gen)
    clean = _attend(q, k, v, table, [1], [20])
    k[7, 4:], v[7, 4:] = float("nan"), float("nan")  # past position 20 in its second block
    k[9:12], v[9:12] = float("nan"), float("nan")  # blocks it does not own yet
    assert torch.equal(_attend(q, k, v, table, [1], [20]), clean)


def test_plan_is_reused_across_layers():
    k, v, gen = _paged()
    table = torch.arange(40, dtype=torch.int32).view(2, 20)
    q1, q2 = torch.randn(2, 41, 9, 64, generator=gen)
    qsl = torch.tensor([0, 40, 41], dtype=torch.int32)
    lens = torch.tensor([100, 250], dtype=torch.int32)
    plan = ExtendAttentionPlan.build(table, qsl, lens, 16, 3)
    a1 = paged_extend_attention_torch(q1, k, v, table, qsl, lens, 0.125, plan=plan)
    a2 = paged_extend_attention_torch(q2, k, v, table, qsl, lens, 0.125, plan=plan)
    assert torch.equal(a1, paged_extend_attention_torch(q1, k, v, table, qsl, lens, 0.125))
    assert torch.equal(a2, paged_extend_attention_torch(q2, k, v, table, qsl, lens, 0.125))


@pytest.fixture
def cpu_attention(request, monkeypatch):
    """The CPU attention the dispatch picks (PAGEDSERVE_CPU_ATTENTION), for one test."""
    monkeypatch.setenv("PAGEDSERVE_CPU_ATTENTION", request.param)
    paged_attention_cpu._library.cache_clear()
    if paged_attention_cpu.backend() != request.param:
        pytest.fail(f"the {request.param} CPU attention is not available here")
    yield request.param
    monkeypatch.undo()
    paged_attention_cpu._library.cache_clear()


@pytest.mark.parametrize("cpu_attention", [
    "torch",
    pytest.param("compiled", marks=pytest.mark.skipif(paged_attention_cpu.backend() != "compiled",
                                                      reason="no compiled CPU attention here")),
], indirect=True)
def test_cache_write_through_the_dispatch(cpu_attention):
    k_std, v_std, gen = _paged(num_blocks=8)
    # The caches as the executor allocates them for this backend (the compiled kernel's own layout),
    # holding the same entries; k_std / v_std become views of them in the standard layout.
    [(k_cache, v_cache)] = allocate_kv_cache(1, 8, 16, 3, 64)
    views = standard_kv_views(k_cache, v_cache)
    for view, entries in zip(views, (k_std, v_std)):
        view.copy_(entries)
    k_std, v_std = views
    key, value = torch.randn(2, 2, 3, 64, generator=gen)  # 2 new tokens, 3 KV heads each
    meta = AttentionMetadata(slot_mapping=torch.tensor([17, 18]), block_table=torch.tensor([[0, 1]], dtype=torch.int32),
                             seq_lens=torch.tensor([19], dtype=torch.int32),
                             query_start_loc=torch.tensor([0, 2], dtype=torch.int32), max_query_len=2)
    query = torch.randn(2, 9, 64, generator=gen)
    out = paged_attention(query, key, value, k_cache, v_cache, meta, 0.125)
    assert torch.equal(k_std[1, 1], key[0]) and torch.equal(v_std[1, 2], value[1])
    if cpu_attention == "torch":
        assert meta.torch_plan is not None and meta.torch_plan.slots_valid
    else:
        assert isinstance(meta.torch_plan, StepLayout)
    # Either implementation gives the twin's values (not its bits: another order of summation).
    expected = paged_extend_attention_torch(query, k_std.contiguous(), v_std.contiguous(), meta.block_table,
                                            meta.query_start_loc, meta.seq_lens, 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_key_chunk_size():
    assert [key_chunk_size(b) for b in (1, 8, 16, 32, 64, 128, 5)] == [64, 64, 64, 64, 64, 128, 320]
    with pytest.raises(ValueError):
        key_chunk_size(0)
