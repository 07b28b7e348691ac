"""kernels.linear_cpu: the fp32 linear layer whose every output is one fmaf chain in ascending k."""

import platform

import pytest
import torch

from kernels import linear_cpu
from kernels.linear_cpu import PANEL, PackedWeight, linear

pytestmark = pytest.mark.skipif(linear_cpu.backend() != "compiled",
                                reason="the compiled kernel cannot run here (no C compiler, or an x86 CPU without FMA)")


def _operands(m, k, n, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, b


@pytest.mark.parametrize("m, k, n", [(1, 576, 960), (5, 576, 576), (16, 1536, 576), (70, 200, 33), (9, 1, 1),
                                     (3, 130, 100), (300, 64, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_values_are_the_product(x_path, m, k, n, bias):
    """Shapes off the panel width (32 columns) and the k block (128) included."""
    x, w, b = _operands(m, k, n, seed=m + k + n, bias=bias)
    got = linear(x, PackedWeight(w), b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.shape == (m, n) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_bias_is_added_once_after_the_chain():
    x, w, b = _operands(7, 300, 70, bias=True)
    packed = PackedWeight(w)
    assert torch.equal(linear(x, packed, b), linear(x, packed) + b)


def test_pack_round_trips_and_pads_with_zeros():
    _, w, _ = _operands(1, 77, 45)
    packed = PackedWeight(w)
    assert packed.panels.shape == (2, 77, PANEL)
    assert torch.equal(packed.unpack(), w)
    assert not packed.panels[1, :, 45 - PANEL:].any()
    # A weight with a row stride other than K packs the same.
    wide = torch.zeros(45, 100)
    wide[:, :77] = w
    assert torch.equal(PackedWeight(wide[:, :77]).panels, packed.panels)


@pytest.fixture(params=["x copied", "x in place"])
def x_path(request):
    """Runs a test with x copied tile by tile from 2 tiles on (Intel's path for large calls) or never
    (AMD's), whichever this CPU defaults to; restores the default."""
    lib = linear_cpu.library()
    lib.linear_cpu_pack_x_tiles(1 if request.param == "x copied" else 2 ** 62)
    yield request.param
    lib.linear_cpu_pack_x_tiles(-1)


def test_copying_x_changes_no_bits():
    x, w, b = _operands(300, 576, 100, seed=3, bias=True)
    packed = PackedWeight(w)
    lib = linear_cpu.library()
    try:
        lib.linear_cpu_pack_x_tiles(1)
        copied = linear(x, packed, b)
        lib.linear_cpu_pack_x_tiles(2 ** 62)
        assert torch.equal(linear(x, packed, b), copied)
    finally:
        lib.linear_cpu_pack_x_tiles(-1)


@pytest.mark.parametrize("k, n", [(576, 960), (1536, 576), (200, 70)])
def test_a_row_has_the_same_bits_in_any_batch(x_path, k, n):
    """Rows 1..70 at every position give the bits of the row alone (and of the full batch)."""
    x, w, b = _operands(70, k, n, seed=k, bias=True)
    packed = PackedWeight(w)
    full = linear(x, packed, b)
    alone = torch.cat([linear(x[i:i + 1], packed, b) for i in range(70)])
    assert torch.equal(alone, full)
    for rows in range(1, 71):
        start = (rows * 37) % (71 - rows)
        assert torch.equal(linear(x[start:start + rows], packed, b), full[start:start + rows]), rows
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(1))
    assert torch.equal(linear(x[perm], packed, b), full[perm])


def test_strided_and_broadcast_rows():
    x, w, _ = _operands(6, 96, 50)
    packed = PackedWeight(w)
    full = linear(x, packed)
    wide = torch.zeros(6, 200)
    wide[:, 10:106] = x
    assert torch.equal(linear(wide[:, 10:106], packed), full)  # a row stride other than K
    assert torch.equal(linear(x[2:3].expand(4, -1), packed), full[2:3].expand(4, -1))  # row stride 0


def test_threads_change_no_bits():
    x, w, b = _operands(300, 576, 960, bias=True)
    packed = PackedWeight(w)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):  # more threads than cores is fine: only the split changes
            torch.set_num_threads(threads)
            results.append((linear(x, packed, b), linear(x[:1], packed, b)))
    finally:
        torch.set_num_threads(before)
    for full, one in results[1:]:
        assert torch.equal(full, results[0][0]) and torch.equal(one, results[0][1])


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction-set levels only")
def test_every_instruction_set_level_gives_the_same_bits(tmp_path):
    """Builds for plain x86-64 (fmaf in libm, 4-row tiles), x86-64-v3 (AVX2+FMA, 3-row tiles) and, where
    the CPU has AVX-512, x86-64-v4 (12-row tiles) give the process's bits: fmaf rounds once."""
    levels = ["x86-64", "x86-64-v3"] + (["x86-64-v4"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])
    x, w, b = _operands(19, 300, 70, bias=True)
    expected = linear(x, PackedWeight(w), b)
    for level in levels:
        flags = ("-DLINEAR_CPU_NO_CLONES", f"-march={level}")
        lib = linear_cpu.load_library(linear_cpu.compile_kernel(tmp_path, flags))
        assert torch.equal(linear(x, PackedWeight(w, library=lib), b), expected), level


def test_empty_batch():
    _, w, _ = _operands(1, 8, 4)
    assert linear(torch.empty(0, 8), PackedWeight(w)).shape == (0, 4)


def test_bad_arguments():
    x, w, b = _operands(3, 16, 8, bias=True)
    packed = PackedWeight(w)
    with pytest.raises(ValueError, match="fp32"):
        PackedWeight(w.double())
    with pytest.raises(ValueError, match="2-D"):
        PackedWeight(w[0])
    with pytest.raises(ValueError, match="empty"):
        PackedWeight(torch.empty(0, 16))
    with pytest.raises(ValueError, match="stride 1"):
        PackedWeight(torch.randn(16, 8).T)
    with pytest.raises(ValueError, match="16 features"):
        linear(x, PackedWeight(torch.randn(8, 12)))
    with pytest.raises(ValueError, match="fp32"):
        linear(x.double(), packed)
    with pytest.raises(ValueError, match="2-D"):
        linear(x[None], packed)
    with pytest.raises(ValueError, match="stride 1"):
        linear(torch.randn(16, 3).T, packed)
    with pytest.raises(ValueError, match="bias"):
        linear(x, packed, b[:4])
    with pytest.raises(ValueError, match="bias"):
        linear(x, packed, b.double())


def test_linear_layer_runs_the_kernel_on_one_packed_copy():
    """executor.linear.Linear in fp32 on the CPU: this kernel's bits, no oneDNN call, and a dropped
    plain weight comes back (state dict, restore) with the same bits."""
    from torch.profiler import profile

    from executor.linear import Linear, linear_path

    assert linear_path(torch.float32).startswith("kernels.linear_cpu")
    lin = Linear(96, 40)
    x = torch.randn(5, 96)
    with torch.inference_mode(), profile() as prof:
        got = lin(x)
        one = lin(x[3:4])
    assert isinstance(lin._pack, PackedWeight)
    assert torch.equal(got, linear(x, lin._pack, lin.bias)) and torch.equal(one, got[3:4])
    names = {ev.name for ev in prof.events()}
    assert not names & {"mkldnn::_linear_pointwise", "mkldnn::_reorder_linear_weight", "aten::linear", "aten::addmm"}
    weight = lin.weight.detach().clone()
    assert lin.drop_plain_weight() and lin.weight.is_meta
    assert torch.equal(lin.state_dict()["weight"], weight)
    with torch.inference_mode():
        assert torch.equal(lin(x), got)
    lin.restore_plain_weight()
    assert torch.equal(lin.weight, weight)
