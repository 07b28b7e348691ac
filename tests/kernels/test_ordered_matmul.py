"""kernels.ordered_matmul: products whose outputs do not depend on the batch or the instruction set."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import ordered_matmul
from kernels.ordered_matmul import OrderedMatmul, load_library


def _operands(b0=2, b1=3, b2=4, m=37, k1=3, k2=64, n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b0, b1, b2, m, k1, k2, generator=gen)
    b = torch.randn(b0, b1, b2, k1, k2, n, generator=gen)
    return a, b


def _run(a, b, **kw):
    out = torch.empty(*a.shape[:4], b.shape[-1])
    rowsum = torch.empty(a.shape[:4])
    OrderedMatmul(a, b, out, rowsum, **kw)()
    return out, rowsum


@pytest.mark.parametrize("use_torch", [False, True], ids=["backend", "torch"])
def test_values_are_the_product(use_torch):
    a, b = _operands()
    out, rowsum = _run(a, b, use_torch=use_torch)
    a2, b2 = a.flatten(4).double(), b.flatten(3, 4).double()
    torch.testing.assert_close(out.double(), a2 @ b2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rowsum.double(), a2.sum(-1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("use_torch", [False, True], ids=["backend", "torch"])
def test_a_row_has_the_same_bits_in_any_batch(use_torch):
    a, b = _operands(m=300, n=96)  # 96: a column tile and a half (the compiled edge path)
    full, full_sum = _run(a, b, use_torch=use_torch)
    for rows in (slice(0, 1), slice(5, 6), slice(0, 3), slice(3, 7), slice(298, 300), slice(17, 229)):
        part, part_sum = _run(a[:, :, :, rows], b, use_torch=use_torch)
        assert torch.equal(part, full[:, :, :, rows]), rows
        assert torch.equal(part_sum, full_sum[:, :, :, rows]), rows
    # Fewer batch entries, and trailing zeros in k (keys a token cannot see) change nothing.
    one, _ = _run(a[1:, 2:, 3:, 40:41], b[1:, 2:, 3:], use_torch=use_torch)
    assert torch.equal(one, full[1:, 2:, 3:, 40:41])
    padded_a = torch.cat([a, torch.zeros_like(a[:, :, :, :, :2])], dim=4)
    padded_b = torch.cat([b, torch.randn_like(b[:, :, :, :2])], dim=3)
    assert torch.equal(_run(padded_a, padded_b, use_torch=use_torch)[0], full)


def test_strided_and_broadcast_operands():
    a, b = _operands(b2=1, k1=1)
    a_wide = a.expand(-1, -1, 5, -1, -1, -1)  # stride 0: the same queries against five chunks
    b_t = torch.randn(2, 3, 5, 1, 64, 64).transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match="stride 1"):
        OrderedMatmul(a_wide, b_t, torch.empty(2, 3, 5, 37, 64))
    b5 = torch.randn(2, 3, 5, 1, 64, 64)
    out, _ = _run(a_wide, b5)
    assert torch.equal(out, _run(a_wide.contiguous(), b5)[0])


def test_bad_arguments():
    a, b = _operands()
    with pytest.raises(ValueError, match="shapes"):
        OrderedMatmul(a, b[:, :, :, :2], torch.empty(2, 3, 4, 37, 64))
    with pytest.raises(ValueError, match="dtype"):
        OrderedMatmul(a, b.double(), torch.empty(2, 3, 4, 37, 64))
    with pytest.raises(ValueError, match="rowsum"):
        OrderedMatmul(a, b, torch.empty(2, 3, 4, 37, 64), torch.empty(2, 3, 4, 36))


def test_missing_compiler_is_an_os_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc-xyz")
    with pytest.raises(OSError, match="no-such-cc-xyz"):
        ordered_matmul._compile(tmp_path)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction-set levels only")
@pytest.mark.skipif(platform.machine() == "x86_64" and ordered_matmul.backend() != "compiled",
                    reason="the compiled backend cannot run here (no C compiler, or an x86 CPU without FMA)")
def test_every_instruction_set_level_gives_the_same_bits(tmp_path):
    """Builds for plain x86-64 (fmaf in libm), x86-64-v3 (AVX2+FMA) and, where the CPU has
    AVX-512, x86-64-v4 give the same bits as the process's backend: fmaf rounds once."""
    levels = ["x86-64", "x86-64-v3"] + (["x86-64-v4"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])
    a, b = _operands(m=9, n=96)
    expected = _run(a, b)
    for level in levels:
        lib = load_library(ordered_matmul._compile(tmp_path, ("-DORDERED_MATMUL_NO_CLONES", f"-march={level}")))
        got = _run(a, b, library=lib)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), level


def test_threads_change_no_bits():
    a, b = _operands(m=300, n=96)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(a, b)
        torch.set_num_threads(3)  # more threads than cores is fine: only the split changes
        three = _run(a, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


@pytest.mark.skipif(platform.machine() == "x86_64" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="on an x86 CPU without AVX2/FMA the compiler is never tried")
def test_without_a_compiler_the_torch_backend_runs(tmp_path):
    """No C compiler: a warning and the torch backend, or an error if the compiled one was asked for."""
    child = (
        "import logging, os\n"
        "logging.basicConfig()\n"
        "from kernels import ordered_matmul as m\n"
        "print(m.backend())\n"
        "os.environ['PAGEDSERVE_ORDERED_MATMUL'] = 'compiled'\n"
        "m._library.cache_clear()\n"
        "try:\n"
        "    m.backend()\n"
        "except OSError as exc:\n"
        "    print('error:', exc)\n"
    )
    env = {**os.environ, "CC": "no-such-cc-xyz", "PAGEDSERVE_KERNEL_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("PAGEDSERVE_ORDERED_MATMUL", None)
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "torch" and "slower torch backend" in proc.stderr
    assert lines[1] == "error: no C compiler 'no-such-cc-xyz' on PATH"
    assert not list(tmp_path.iterdir())
