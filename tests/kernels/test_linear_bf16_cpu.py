"""kernels.linear_bf16_cpu: the bf16 linear layer on AMX tiles or AVX512-BF16 (fp32 sums, one bf16 rounding).

The tests that multiply run once per instruction set this CPU has (both on a CPU with AMX: the
AVX512-BF16 path is forced there through ``use_isa``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import linear_bf16_cpu
from kernels.linear_bf16_cpu import PANEL, PackedWeight, linear

CPUINFO = Path("/proc/cpuinfo")


#: The instruction set the kernel picks on this CPU (None where it does not run).
BEST_ISA = linear_bf16_cpu.isa()


@pytest.fixture(params=[
    pytest.param("AMX", marks=pytest.mark.skipif(BEST_ISA != "AMX", reason="no AMX-BF16 here (or no C compiler)")),
    pytest.param("AVX512-BF16", marks=pytest.mark.skipif(
        BEST_ISA is None, reason="no AVX512-BF16 here (or no C compiler): the kernel does not run")),
])
def isa(request):
    """Runs the test on one instruction set of this CPU, then restores the one it picks."""
    assert linear_bf16_cpu.use_isa(request.param) == request.param
    yield request.param
    linear_bf16_cpu.use_isa(BEST_ISA)


def _operands(m, k, n, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    return x, w, b


@pytest.mark.skipif(not sys.platform.startswith("linux") or not CPUINFO.is_file(), reason="needs /proc/cpuinfo")
def test_available_where_the_cpu_has_avx512_bf16_and_on_amx_where_it_has_that():
    flags = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    has_bf16 = {"avx512_bf16", "avx512bw", "avx512vl"} <= flags
    # Linux may still refuse the AMX tile state (an old kernel): then AVX512-BF16.
    if linear_bf16_cpu.backend() == "compiled":
        assert linear_bf16_cpu.available() == has_bf16
        if has_bf16:
            assert linear_bf16_cpu.isa() == "AMX" or linear_bf16_cpu.isa() == "AVX512-BF16"
            if linear_bf16_cpu.isa() == "AMX":
                assert {"amx_bf16", "amx_tile"} <= flags
    else:
        assert not linear_bf16_cpu.available()
    if not has_bf16:
        assert linear_bf16_cpu.isa() is None
    elif "amx_tile" not in flags:
        assert linear_bf16_cpu.isa() == "AVX512-BF16"
        assert linear_bf16_cpu.use_isa("AMX") == "AVX512-BF16"  # cannot be forced onto a CPU without it
    with pytest.raises(ValueError, match="unknown instruction set"):
        linear_bf16_cpu.use_isa("avx512")
    if not linear_bf16_cpu.available():
        with pytest.raises(RuntimeError, match="does not run here"):
            PackedWeight(torch.zeros(4, 4, dtype=torch.bfloat16))


def test_environment_variable_turns_it_off():
    code = "from kernels import linear_bf16_cpu as k; print(k.backend(), k.available())"
    env = {**os.environ, linear_bf16_cpu.ENV_VAR: "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["torch", "False"]


@pytest.mark.parametrize("m, k, n", [(1, 576, 960), (5, 576, 576), (16, 1536, 576), (17, 576, 3072), (70, 200, 33),
                                     (9, 1, 1), (3, 37, 100), (300, 64, 40), (33, 70, 40), (13, 577, 70)])
@pytest.mark.parametrize("bias", [False, True])
def test_values_are_the_product_rounded_once(isa, m, k, n, bias):
    """Shapes off the panel width (32 columns), the tile depth (32 values of k), odd k, row tails."""
    x, w, b = _operands(m, k, n, seed=m + k + n, bias=bias)
    got = linear(x, PackedWeight(w), b)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16 and got.is_contiguous()
    exact = x.double() @ w.double().T + (b.double() if bias else 0)
    # fp32 sums of exact products, then one rounding to bf16 (2**-8 relative at most), so within
    # one bf16 ulp of the exact value's rounding.
    torch.testing.assert_close(got.double(), exact, rtol=2 ** -7, atol=1e-5 * k ** 0.5)
    assert (got != exact.to(torch.bfloat16)).float().mean() < 0.01


def test_bias_is_added_before_the_rounding(isa):
    x, w, b = _operands(7, 64, 70, bias=True)
    exact = x.double() @ w.double().T + b.double()
    got = linear(x, PackedWeight(w), b)
    # Adding the bias to the rounded product would round twice; the sums here are exact in fp32.
    assert torch.equal(got, exact.to(torch.bfloat16))


def test_pack_round_trips_and_pads_with_zeros(isa):
    _, w, _ = _operands(1, 77, 45)
    packed = PackedWeight(w)
    assert packed.panels.shape == (2, 48, PANEL, 2)  # ceil(77 / 2) = 39 pairs, up to a multiple of 16
    assert torch.equal(packed.unpack(), w)
    assert not packed.panels[1, :, 45 - PANEL:].any() and not packed.panels[:, 39:].any()
    assert not packed.panels[:, 38, :, 1].any()  # the odd k's missing partner
    wide = torch.zeros(45, 100, dtype=torch.bfloat16)
    wide[:, :77] = w
    assert torch.equal(PackedWeight(wide[:, :77]).panels, packed.panels)


@pytest.mark.parametrize("k, n", [(576, 960), (1536, 576), (577, 70)])
def test_a_row_has_the_same_bits_in_any_batch_and_with_any_threads(isa, k, n):
    """70 rows (AMX: four 16-row tiles read in place and a last one of 6 rows copied; AVX512-BF16:
    five tiles of 12 rows and one of 10), by a team of two OpenMP threads (the suite otherwise runs
    torch on one thread, which never forms a team); an odd k has a last pair with a zero partner."""
    x, w, b = _operands(70, k, n, seed=k, bias=True)
    packed = PackedWeight(w)
    full = linear(x, packed, b)
    alone = torch.cat([linear(x[i:i + 1], packed, b) for i in range(70)])
    assert torch.equal(alone, full)
    threads = torch.get_num_threads()
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            assert torch.equal(linear(x, packed, b), full)
            assert torch.equal(torch.cat([linear(x[i:i + 1], packed, b) for i in range(3)]), full[:3])
    finally:
        torch.set_num_threads(threads)


def test_rows_with_a_stride_and_large_calls(isa):
    x, w, _ = _operands(600, 96, 64, seed=4)
    wide = torch.zeros(600, 200, dtype=torch.bfloat16)
    wide[:, 10:106] = x
    packed = PackedWeight(w)
    got = linear(wide[:, 10:106], packed)
    assert torch.equal(got, linear(x, packed))
    # 600 rows: three blocks of rows (256 each), the last one partly filled.
    assert torch.equal(got[512:], linear(x[512:], packed))


def test_bad_input_is_refused(isa):
    x, w, _ = _operands(3, 64, 32)
    packed = PackedWeight(w)
    with pytest.raises(ValueError, match="bf16"):
        linear(x.float(), packed)
    with pytest.raises(ValueError, match="features"):
        linear(x[:, :32], packed)
    with pytest.raises(ValueError, match="stride 1"):
        linear(x.t().contiguous().t(), packed)
    with pytest.raises(ValueError, match="bias"):
        linear(x, packed, torch.zeros(31, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bf16"):
        PackedWeight(w.float())
    with pytest.raises(ValueError, match="empty"):
        PackedWeight(torch.zeros(0, 4, dtype=torch.bfloat16))


def test_two_threads_with_their_own_weights_do_not_share_a_buffer(isa):
    """Each calling thread copies x into its own buffer (ctypes releases the GIL during the call)."""
    import threading

    cases = [_operands(64 + 16 * i, 576, 256, seed=i) for i in range(2)]
    packs = [PackedWeight(w) for _, w, _ in cases]
    want = [linear(x, p) for (x, _, _), p in zip(cases, packs)]
    bad = []

    def run(i):
        for _ in range(200):
            if not torch.equal(linear(cases[i][0], packs[i]), want[i]):
                bad.append(i)
                return

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
