"""kernels.argmax_cpu: the same indices as ``torch.max(x, dim=-1).indices`` for any row (ties, signed
zeros, infinities, NaNs, rows shorter than a vector, strided rows), in fp32 and bf16, from every
instruction-set build and any number of threads."""

import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import argmax_cpu
from kernels.argmax_cpu import argmax_rows, load_library
from kernels.c_build import compile_library

pytestmark = pytest.mark.skipif(argmax_cpu.backend() != "compiled", reason="no working C compiler")

# Few distinct values, so that ties (and +0 / -0) are common; -inf, inf and NaN among them.
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan")]


def _expected(x: torch.Tensor) -> list[int]:
    return x.max(dim=-1).indices.tolist()


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 5), n=st.integers(1, 70), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       data=st.data())
def test_the_indices_of_torch_max(rows, n, dtype, data):
    values = data.draw(st.lists(st.sampled_from(SPECIAL) | st.floats(-4, 4, width=32), min_size=rows * n,
                                max_size=rows * n))
    x = torch.tensor(values, dtype=torch.float32).view(rows, n).to(dtype)
    assert argmax_rows(x) == _expected(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_sized_rows_with_ties_and_strides(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 49152 + 7, generator=g) * 4).round().to(dtype)  # integers: many ties
    x[3, 40000] = x[3].max() + 1  # a lone maximum late in a row
    x[5, :] = float("-inf")  # all equal: index 0
    x[6, 123] = float("nan")
    x[6, 9000] = float("nan")  # the first NaN wins
    view = x[:, 3:49155]  # row stride larger than the width, rows not 64-byte aligned
    assert argmax_rows(view) == _expected(view)
    assert argmax_rows(x) == _expected(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_change_nothing(dtype):
    x = torch.randn(96, 4096, generator=torch.Generator().manual_seed(1)).to(dtype)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(argmax_rows(x))
    finally:
        torch.set_num_threads(old)
    assert results[0] == results[1] == results[2] == _expected(x)


def test_other_inputs_fall_back_or_raise():
    x = torch.randn(3, 10, dtype=torch.float16)
    assert argmax_rows(x) == _expected(x)  # fp16: torch.max
    t = torch.randn(10, 3).t()  # stride 3 in the last dimension
    assert argmax_rows(t) == _expected(t)
    assert argmax_rows(torch.empty(0, 5)) == []
    for bad in (torch.zeros(5), torch.zeros(2, 0), torch.zeros(2, 3, 4)):
        with pytest.raises(ValueError, match="expected logits"):
            argmax_rows(bad)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="instruction-set levels are x86-64's")
def test_every_instruction_set_level_gives_the_same_indices(tmp_path, monkeypatch):
    levels = ["x86-64", "x86-64-v3"] + (["x86-64-v4"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])
    g = torch.Generator().manual_seed(2)
    inputs = [(torch.randn(9, 1000 + k, generator=g) * 3).round().to(dtype)
              for k, dtype in enumerate([torch.float32, torch.bfloat16] * 2)]
    for x in inputs[2:]:  # specials in the vector loop and in the tail
        x[1, 500], x[2, -1], x[3, :] = float("nan"), float("nan"), float("-inf")
        x[4, 17], x[4, 40], x[5, -2] = float("inf"), float("inf"), float("inf")
        x[6, :] = 0.0
        x[6, 33] = -0.0
    for level in levels:
        flags = (*argmax_cpu.EXTRA_FLAGS, "-DARGMAX_CPU_NO_CLONES", f"-march={level}")
        lib = load_library(compile_library(argmax_cpu._SOURCE, tmp_path, flags))
        monkeypatch.setattr(argmax_cpu._KERNEL, "library", lambda lib=lib: lib)
        for x in inputs:
            assert argmax_rows(x) == _expected(x), level
