"""kernels.fused_cpu: the fused residual add + RMSNorm, RoPE and SiLU * up against their torch formulas,
and the same bits for a row alone, in any batch, at any position, and from every instruction-set build;
in fp32 and in bf16."""

import platform

import pytest
import torch
import torch.nn.functional as F

from kernels import fused_cpu
from kernels.c_build import compile_library
from kernels.fused_cpu import add_rms_norm, load_library, rope_rotate_, silu_and_mul

pytestmark = pytest.mark.skipif(fused_cpu.backend() != "compiled",
                                reason="no working C compiler, or an x86 CPU without AVX2/FMA")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 576, 9, 3, 64, 1536


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _norm_inputs(rows: int, seed: int = 0):
    g = _gen(seed)
    return (torch.randn(rows, HIDDEN, generator=g), torch.randn(rows, HIDDEN, generator=g) * 3,
            torch.randn(HIDDEN, generator=g))


def _rope_tables(rows: int, seed: int = 1):
    angles = torch.rand(rows, 1, HEAD_DIM // 2, generator=_gen(seed)) * 100
    emb = torch.cat((angles, angles), dim=-1)
    sin = emb.sin()
    return emb.cos(), torch.cat((-sin[..., : HEAD_DIM // 2], sin[..., HEAD_DIM // 2 :]), dim=-1)


def _rope_reference(qkv, cos, ssin):
    heads = qkv[:, : (HEADS + KV_HEADS) * HEAD_DIM].view(qkv.shape[0], HEADS + KV_HEADS, HEAD_DIM)
    return heads * cos + torch.roll(heads, HEAD_DIM // 2, dims=-1) * ssin


def _bf16(*tensors):
    return tuple(t.to(torch.bfloat16) for t in tensors)


def _torch_formula(monkeypatch, fn):
    """``fn()`` with the library switched off: the torch formulas the kernels replace."""
    with monkeypatch.context() as m:
        m.setattr(fused_cpu._KERNEL, "library", lambda: None)
        return fn()


def _assert_within_one_bf16_ulp(got, expected, equal_share=0.99):
    """``got`` and ``expected`` (bf16) differ by at most one bf16 ulp of ``expected`` anywhere (2^-7 of
    its binade's lower bound: 8 significant bits), and at least ``equal_share`` of them in no bit."""
    assert got.dtype is expected.dtype is torch.bfloat16 and got.shape == expected.shape
    g, e = got.float(), expected.float()
    ulp = torch.ldexp(torch.ones_like(e), torch.frexp(e).exponent - 8)
    assert ((g - e).abs() <= ulp).all(), ((g - e).abs() / ulp).max()
    assert (got.view(torch.int16) == expected.view(torch.int16)).float().mean() >= equal_share


def test_add_rms_norm_is_the_sum_then_the_hf_norm():
    x, res, w = _norm_inputs(37)
    expected_sum = x + res
    expected = F.rms_norm(expected_sum, (HIDDEN,), w, 1e-5)
    out, new_res = add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    assert torch.equal(new_res, expected_sum)  # one fp32 addition: exact
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6)


def test_add_rms_norm_works_in_place():
    x, res, w = _norm_inputs(5)
    x_in, res_in = x.clone(), res.clone()
    out, new_res = add_rms_norm(x_in, res_in, w, 1e-6)
    assert out.data_ptr() == x_in.data_ptr() and new_res.data_ptr() == res_in.data_ptr()
    assert torch.equal(res_in, x + res)


def test_rms_norm_without_residual_keeps_its_input():
    x, _, w = _norm_inputs(6)
    x_in = x.clone()
    out, res = add_rms_norm(x_in, None, w, 1e-5)
    assert res is x_in and torch.equal(x_in, x)
    torch.testing.assert_close(out, F.rms_norm(x, (HIDDEN,), w, 1e-5), rtol=2e-6, atol=1e-6)


def test_add_rms_norm_rows_do_not_depend_on_the_batch():
    x, res, w = _norm_inputs(300, seed=3)
    full, full_res = add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    for rows in (slice(0, 1), slice(7, 8), slice(0, 2), slice(5, 20), slice(299, 300)):
        out, new_res = add_rms_norm(x[rows].clone(), res[rows].clone(), w, 1e-5)
        assert torch.equal(out, full[rows]) and torch.equal(new_res, full_res[rows]), rows
    # A row of a wider buffer (the one-row linear layer's output is the first of two rows).
    wide = torch.zeros(2, HIDDEN + 8)
    wide[0, :HIDDEN] = x[9]
    out, _ = add_rms_norm(wide[:1, :HIDDEN], res[9:10].clone(), w, 1e-5)
    assert torch.equal(out, full[9:10])


def test_rope_is_the_torch_rotation_exactly():
    rows = 23
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=_gen(4))
    cos, ssin = _rope_tables(rows)
    expected = _rope_reference(qkv, cos, ssin)
    got = rope_rotate_(qkv.clone(), HEADS + KV_HEADS, HEAD_DIM, cos, ssin)
    assert torch.equal(got[:, : (HEADS + KV_HEADS) * HEAD_DIM].view_as(expected), expected)
    assert torch.equal(got[:, (HEADS + KV_HEADS) * HEAD_DIM :], qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :])  # v untouched


def test_rope_rows_do_not_depend_on_the_batch():
    qkv = torch.randn(40, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=_gen(5))
    cos, ssin = _rope_tables(40)
    full = rope_rotate_(qkv.clone(), HEADS + KV_HEADS, HEAD_DIM, cos, ssin)
    for rows in (slice(0, 1), slice(13, 14), slice(3, 19)):
        one = rope_rotate_(qkv[rows].clone(), HEADS + KV_HEADS, HEAD_DIM, cos[rows], ssin[rows])
        assert torch.equal(one, full[rows]), rows


def test_silu_and_mul_is_the_torch_formula():
    gate_up = torch.randn(11, 2 * INTER, generator=_gen(6)) * 4
    gate, up = gate_up.split(INTER, dim=-1)
    expected = F.silu(gate) * up
    torch.testing.assert_close(silu_and_mul(gate_up), expected, rtol=1e-6, atol=1e-7)
    extreme = torch.tensor([[-200.0, -88.0, 0.0, 88.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(silu_and_mul(extreme), F.silu(extreme[:, :5]), rtol=1e-6, atol=1e-7)


def test_silu_and_mul_rows_do_not_depend_on_the_batch():
    gate_up = torch.randn(70, 2 * INTER, generator=_gen(7))
    full = silu_and_mul(gate_up)
    for rows in (slice(0, 1), slice(33, 34), slice(2, 17), slice(69, 70)):
        assert torch.equal(silu_and_mul(gate_up[rows]), full[rows]), rows


def test_torch_formulas_where_the_kernels_do_not_run(monkeypatch):
    """Other dtypes (fp16; and, the same way, CUDA tensors or no compiler) take the torch formulas:
    new tensors, the statistic in fp32, the scale in the input dtype."""
    x, res, w = _norm_inputs(4)
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype), res.to(dtype)
        s = low[0] + low[1]
        if dtype is torch.bfloat16:
            monkeypatch.setattr(fused_cpu._KERNEL, "library", lambda: None)  # bf16 is compiled where the library is
        out, new_res = add_rms_norm(*low, w.to(dtype), 1e-5)
        assert torch.equal(new_res, s) and out.dtype is dtype
        s32 = s.float()
        ref = w.to(dtype) * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        assert torch.equal(out, ref)
    assert fused_cpu.backend() == "torch"
    qkv = torch.randn(3, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=_gen(8))
    cos, ssin = _rope_tables(3)
    expected = _rope_reference(qkv, cos, ssin)
    assert torch.equal(rope_rotate_(qkv.clone(), HEADS + KV_HEADS, HEAD_DIM, cos, ssin)[:, :768].view_as(expected),
                       expected)
    gate_up = torch.randn(3, 2 * INTER, generator=_gen(9))
    assert torch.equal(silu_and_mul(gate_up), F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:])
    out, new_res = add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    assert torch.equal(new_res, x + res) and torch.equal(out, F.rms_norm(x + res, (HIDDEN,), w, 1e-5))


def test_bad_layouts_raise():
    x, res, w = _norm_inputs(4)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x.clone(), res[:3].clone(), w, 1e-5)
    with pytest.raises(ValueError, match="x must be"):
        add_rms_norm(x.t().contiguous().t(), res.clone(), w, 1e-5)
    with pytest.raises(ValueError, match="even"):
        rope_rotate_(x.clone(), 1, 63, *_rope_tables(4))
    cos, ssin = _rope_tables(4)
    with pytest.raises(ValueError, match="signed_sin"):
        rope_rotate_(torch.zeros(4, 768), 12, HEAD_DIM, cos, ssin[:3])
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.zeros(2, 7))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="instruction-set levels are x86-64's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_instruction_set_level_gives_the_same_bits(tmp_path, monkeypatch, dtype):
    """Builds for plain x86-64, x86-64-v3 (AVX2) and, where the CPU has AVX-512, x86-64-v4 agree
    bit for bit with the process's library: no fused multiply-adds, one order of summation."""
    levels = ["x86-64", "x86-64-v3"] + (["x86-64-v4"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])
    x, res, w = (t.to(dtype) for t in _norm_inputs(9, seed=10))
    gate_up = torch.randn(9, 2 * INTER, generator=_gen(11)).to(dtype)
    qkv = torch.randn(9, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=_gen(12)).to(dtype)
    cos, ssin = (t.to(dtype) for t in _rope_tables(9))
    expected = (add_rms_norm(x.clone(), res.clone(), w, 1e-5)[0], silu_and_mul(gate_up),
                rope_rotate_(qkv.clone(), HEADS + KV_HEADS, HEAD_DIM, cos, ssin))
    for level in levels:
        flags = (*fused_cpu.EXTRA_FLAGS, "-DFUSED_CPU_NO_CLONES", f"-march={level}")
        lib = load_library(compile_library(fused_cpu._SOURCE, tmp_path, flags))
        monkeypatch.setattr(fused_cpu._KERNEL, "library", lambda lib=lib: lib)
        got = (add_rms_norm(x.clone(), res.clone(), w, 1e-5)[0], silu_and_mul(gate_up),
               rope_rotate_(qkv.clone(), HEADS + KV_HEADS, HEAD_DIM, cos, ssin))
        for g, e in zip(got, expected):
            assert torch.equal(g, e), level


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_change_no_bits(dtype):
    """A prefill-sized call (over PARALLEL_MIN elements) splits its rows between threads; each row is
    still computed whole by one, so 1, 2 and 3 threads give the bits of the rows computed alone."""
    rows = 200  # 200 x 576 and 200 x 1536 elements: above the C file's PARALLEL_MIN
    x, res, w = (t.to(dtype) for t in _norm_inputs(rows, seed=30))
    gate_up = torch.randn(rows, 2 * INTER, generator=_gen(31)).to(dtype)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=_gen(32)).to(dtype)
    cos, ssin = (t.to(dtype) for t in _rope_tables(rows))

    def run(sl=slice(None)):
        return (add_rms_norm(x[sl].clone(), res[sl].clone(), w, 1e-5)[0], silu_and_mul(gate_up[sl]),
                rope_rotate_(qkv[sl].clone(), HEADS + KV_HEADS, HEAD_DIM, cos[sl], ssin[sl]))

    alone = [torch.cat(parts) for parts in zip(*(run(slice(i, i + 1)) for i in range(rows)))]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for got, expected in zip(run(), alone):
                assert torch.equal(got, expected), threads
    finally:
        torch.set_num_threads(before)


# bf16: the same kernels with bf16 loads and stores, rounding where torch's bf16 operators round.


def test_bf16_add_rms_norm_is_the_torch_formula_within_one_ulp(monkeypatch):
    """The sum is torch's bf16 addition exactly; the norm is the torch formula's bits except where the
    fp32 statistic (another order of summation) moves a value across a bf16 rounding boundary."""
    x, res, w = _bf16(*_norm_inputs(64, seed=20))
    for eps in (1e-5, 1e-6):
        out, new_res = add_rms_norm(x.clone(), res.clone(), w, eps)
        expected, expected_sum = _torch_formula(monkeypatch, lambda: add_rms_norm(x.clone(), res.clone(), w, eps))
        assert out.dtype is new_res.dtype is torch.bfloat16
        assert torch.equal(new_res, x + res)
        _assert_within_one_bf16_ulp(out, expected)
        alone, same = add_rms_norm(x, None, w, eps)
        assert same is x
        _assert_within_one_bf16_ulp(alone, _torch_formula(monkeypatch, lambda: add_rms_norm(x, None, w, eps))[0])


def test_bf16_add_rms_norm_works_in_place_and_row_by_row():
    x, res, w = _bf16(*_norm_inputs(40, seed=21))
    x_in, res_in = x.clone(), res.clone()
    out, new_res = add_rms_norm(x_in, res_in, w, 1e-5)
    assert out.data_ptr() == x_in.data_ptr() and new_res.data_ptr() == res_in.data_ptr()
    assert torch.equal(res_in, x + res)
    x_kept = x.clone()
    alone, same = add_rms_norm(x_kept, None, w, 1e-5)
    assert same is x_kept and torch.equal(x_kept, x) and alone.data_ptr() != x_kept.data_ptr()
    for rows in (slice(0, 1), slice(17, 18), slice(3, 29)):
        one, one_res = add_rms_norm(x[rows].clone(), res[rows].clone(), w, 1e-5)
        assert torch.equal(one, out[rows]) and torch.equal(one_res, new_res[rows]), rows


def test_bf16_rope_is_the_torch_rotation_exactly():
    """Each product and the sum rounded to bf16 as torch's three bf16 operators round them: the same
    bits (rounding once after an fp32 sum would differ in about a third of the elements)."""
    rows = 29
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=_gen(22)).to(torch.bfloat16)
    cos, ssin = _bf16(*_rope_tables(rows, seed=23))
    expected = _rope_reference(qkv, cos, ssin)
    got = rope_rotate_(qkv.clone(), HEADS + KV_HEADS, HEAD_DIM, cos, ssin)
    assert torch.equal(got[:, : (HEADS + KV_HEADS) * HEAD_DIM].view_as(expected), expected)
    assert torch.equal(got[:, (HEADS + KV_HEADS) * HEAD_DIM :], qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :])
    one = rope_rotate_(qkv[7:8].clone(), HEADS + KV_HEADS, HEAD_DIM, cos[7:8], ssin[7:8])
    assert torch.equal(one, got[7:8])


def test_bf16_rope_with_the_models_tables():
    """The tables the model passes in bf16: RotaryEmbedding.cos_sin in the activations' dtype."""
    from executor.rotary import RotaryEmbedding
    from transformers import LlamaConfig

    rotary = RotaryEmbedding(LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                         rope_theta=1e5, max_position_embeddings=8192), HEAD_DIM)
    positions = torch.tensor([0, 1, 17, 900, 8000])
    cos, sin = rotary.cos_sin(positions, torch.bfloat16)
    ssin = RotaryEmbedding.signed_sin(sin)
    assert cos.dtype is ssin.dtype is torch.bfloat16
    qkv = torch.randn(5, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=_gen(24)).to(torch.bfloat16)
    heads = qkv[:, : (HEADS + KV_HEADS) * HEAD_DIM].view(5, HEADS + KV_HEADS, HEAD_DIM)
    expected = RotaryEmbedding.rotate(heads, cos, ssin)
    got = rope_rotate_(qkv.clone(), HEADS + KV_HEADS, HEAD_DIM, cos, ssin)
    assert torch.equal(got[:, : (HEADS + KV_HEADS) * HEAD_DIM].view_as(expected), expected)


def test_bf16_silu_and_mul_is_the_torch_formula_within_one_ulp():
    """silu rounded to bf16, then the product rounded: torch's F.silu then * in bf16, except where the
    kernel's exp (1-2 fp32 ulp from torch's) moves silu across a bf16 rounding boundary."""
    gate_up = (torch.randn(48, 2 * INTER, generator=_gen(25)) * 4).to(torch.bfloat16)
    gate, up = gate_up.split(INTER, dim=-1)
    got = silu_and_mul(gate_up)
    _assert_within_one_bf16_ulp(got, F.silu(gate) * up)
    assert torch.equal(silu_and_mul(gate_up[5:6]), got[5:6])
    extreme = torch.tensor([[-200.0, -88.0, 0.0, 88.0, 200.0, 3e38, float("nan")] + [1.0] * 7]).to(torch.bfloat16)
    got = silu_and_mul(extreme)
    assert got.dtype is torch.bfloat16 and torch.isnan(got[0, 6])
    torch.testing.assert_close(got[:, :6], F.silu(extreme[:, :6]), rtol=0, atol=1e-30)


def test_bf16_bad_layouts_raise():
    x, res, w = _bf16(*_norm_inputs(4))
    with pytest.raises(ValueError, match="residual must be a torch.bfloat16"):
        add_rms_norm(x.clone(), res.float(), w, 1e-5)
    with pytest.raises(ValueError, match="x must be"):
        add_rms_norm(x.t().contiguous().t(), res.clone(), w, 1e-5)
    cos, ssin = _rope_tables(4)
    qkv = torch.zeros(4, 768, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cos must be a torch.bfloat16"):
        rope_rotate_(qkv, 12, HEAD_DIM, cos, ssin.to(torch.bfloat16))
    with pytest.raises(ValueError, match="signed_sin"):
        rope_rotate_(qkv, 12, HEAD_DIM, cos.to(torch.bfloat16), ssin.to(torch.bfloat16)[:3])
    with pytest.raises(ValueError, match="gate_up must be"):
        silu_and_mul(torch.zeros(2, 2 * INTER, dtype=torch.bfloat16).t().contiguous().t())
