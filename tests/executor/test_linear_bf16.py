"""bf16 linear layers on packed weights: our kernel for every call, on AMX or AVX512-BF16 (oneDNN's
with PAGEDSERVE_LINEAR_BF16_CPU=torch), one pack per weight.

Which CPUs take the path (``cpu_has_native_bf16`` against the kernel's CPU flags), and on those
that do: the packed products are the ones that run (operator counts, by number of rows), nothing
is repacked per call, they match ``F.linear``, and the plain weight can be dropped and restored bit
for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from executor.linear import (ONEDNN_BF16_LINEAR, ONEDNN_LINEAR, PACKED_DTYPES, Linear, bf16_own_kernel,
                             cpu_has_native_bf16, linear_path)
from kernels import linear_bf16_cpu

NO_BF16_PATH = ("no packed oneDNN bf16 path: the CPU lacks AVX512-BF16 and AMX, ONEDNN_MAX_CPU_ISA caps oneDNN at "
                "AVX2, or torch lacks oneDNN")
NEEDS_BF16 = pytest.mark.skipif(not ONEDNN_BF16_LINEAR, reason=NO_BF16_PATH)
CPUINFO = Path("/proc/cpuinfo")
#: Rows of the largest call: above the kernel's 256-row blocks, as a prefill chunk is.
ROWS = 300


def _bf16_linear(in_f: int, out_f: int, bias: bool, seed: int) -> tuple[Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lin = Linear(in_f, out_f, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=gen) * 0.1)
    return lin, torch.randn(ROWS, in_f, generator=gen).to(torch.bfloat16)


def _op_counts(fn) -> dict[str, int]:
    with profile() as prof:
        fn()
    counts: dict[str, int] = {}
    for ev in prof.events():
        counts[ev.name] = counts.get(ev.name, 0) + 1
    return counts


@pytest.mark.skipif(not sys.platform.startswith("linux") or not CPUINFO.is_file(), reason="needs /proc/cpuinfo")
def test_native_bf16_detection_agrees_with_the_cpu_flags():
    flags = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
    onednn_takes_bf16 = ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported()  # False under an AVX2 cap
    assert (torch.bfloat16 in PACKED_DTYPES) == ONEDNN_BF16_LINEAR == (onednn_takes_bf16 and cpu_has_native_bf16())
    assert linear_path(torch.float16).startswith("F.linear")
    assert bf16_own_kernel() == (ONEDNN_BF16_LINEAR and linear_bf16_cpu.available())
    expected = f"kernels.linear_bf16_cpu on {linear_bf16_cpu.isa()}" if bf16_own_kernel() else "oneDNN bf16" if ONEDNN_BF16_LINEAR else "F.linear"
    assert linear_path(torch.bfloat16).startswith(expected)


@NEEDS_BF16
@pytest.mark.parametrize("in_f, out_f, bias", [(576, 960, False), (1536, 576, False), (896, 1152, True)])
def test_packed_bf16_matches_f_linear(in_f, out_f, bias):
    lin, x = _bf16_linear(in_f, out_f, bias, seed=in_f + out_f)
    with torch.inference_mode():
        for rows in (1, 2, 16, 70, 128, ROWS):
            got = lin(x[:rows])
            assert got.dtype == torch.bfloat16 and got.shape == (rows, out_f)
            # One bf16 rounding of the fp32 sum apart at most (same kernels, other blocking).
            torch.testing.assert_close(got, F.linear(x[:rows], lin.weight, lin.bias), rtol=1.6e-2, atol=1e-2)
    if bf16_own_kernel():
        assert type(lin._pack) is linear_bf16_cpu.PackedWeight
    else:
        assert lin._pack is not None and lin._pack.dtype == torch.bfloat16
    others = [k for k, v in vars(lin).items() if k != "_pack" and isinstance(v, torch.Tensor) and v.is_mkldnn]
    assert not others, others  # one pack only


@NEEDS_BF16
def test_packed_bf16_runs_without_a_reorder_per_call():
    """Every call runs on our kernel (no torch operator) where it runs, else on oneDNN's pack."""
    lin, x = _bf16_linear(576, 960, True, seed=3)
    sizes = (1, 2, 16, 70, 127, 128, ROWS)
    with torch.inference_mode():
        lin(x[:2])  # packs
        pack = lin._pack
        got = [lin(x[:rows]) for rows in sizes]
        counts = _op_counts(lambda: [lin(x[:rows]) for rows in sizes])
        if bf16_own_kernel():
            for rows, g in zip(sizes, got):
                assert torch.equal(g, linear_bf16_cpu.linear(x[:rows], lin._pack, lin.bias))
    assert counts.get("mkldnn::_linear_pointwise", 0) == (0 if bf16_own_kernel() else len(sizes))
    for op in ("mkldnn::_reorder_linear_weight", "aten::linear", "aten::addmm", "aten::mm", "aten::to_dense"):
        assert counts.get(op, 0) == 0, (op, counts)
    assert lin._pack is pack


@NEEDS_BF16
def test_bf16_plain_weight_is_dropped_and_restored_exactly():
    lin, x = _bf16_linear(576, 3072, False, seed=5)
    original = lin.weight.detach().clone()
    with torch.inference_mode():
        before = lin(x)
    assert lin.drop_plain_weight() and lin.weight.is_meta and lin.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        assert torch.equal(lin(x), before)
    assert torch.equal(lin.state_dict()["weight"], original)
    lin.restore_plain_weight()
    assert torch.equal(lin.weight, original)
    with torch.no_grad():
        lin.weight.mul_(2)  # repacked on the next call
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), 2 * before, rtol=1.6e-2, atol=1e-2)


def test_input_of_another_dtype_is_not_fed_to_the_pack():
    """An fp32 input to a bf16 layer (or the reverse) gets F.linear's dtype error, not a oneDNN one."""
    lin, x = _bf16_linear(64, 32, False, seed=7)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="dtype"):
        lin(x.float())
