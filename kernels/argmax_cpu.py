"""Greedy decoding's argmax of each row of the logits, compiled for the CPU.

At temperature 0 the sampler takes each row's first maximum (``torch.max(x, dim=-1).indices``).
torch's CPU kernel for that walks a row one element at a time: about 1.3 ms for the ``[64, 49152]``
bf16 logits of a batch-64 decode step on this project's 2-core test machine, a few percent of the
step. ``kernels/argmax_cpu.c`` (built, cached and loaded as :mod:`kernels.c_build` describes) keeps
16 running maxima per row in vector lanes and merges them at the end, with the same answer
bit for bit: the first index of the maximum, equal values (``+0`` and ``-0`` too) keeping the
earlier index, a NaN beating every number (the first NaN wins), as torch's kernel does.

fp32 and bf16 CPU tensors run the compiled kernel; anything else, a machine where it cannot be
built, or ``PAGEDSERVE_ARGMAX_CPU=torch`` runs ``torch.max`` (:func:`backend` says which).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kernels.c_build import CKernel

_SOURCE = Path(__file__).with_name("argmax_cpu.c")
_ENV = "PAGEDSERVE_ARGMAX_CPU"
#: -fopenmp: many rows are split between torch's threads. -fno-trapping-math lets the selects vectorise.
EXTRA_FLAGS = ("-fno-trapping-math", "-fopenmp")
_SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}

__all__ = ["argmax_rows", "backend", "build", "library"]


def load_library(path: Path) -> ctypes.CDLL:
    """Load a build of ``argmax_cpu.c`` and declare its functions' signatures."""
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in _SUFFIX.values():
        fn = getattr(lib, "argmax_rows" + suffix)
        fn.restype = None
        fn.argtypes = [p, i64, i64, i64, p, i64]
    return lib


_KERNEL = CKernel(_SOURCE, _ENV, load_library, "torch.max", EXTRA_FLAGS)
build, backend, library = _KERNEL.build, _KERNEL.backend, _KERNEL.library


def argmax_rows(x: torch.Tensor) -> list[int]:
    """The index of each row's first maximum: ``torch.max(x, dim=-1).indices.tolist()``, the same ints.

    Args:
        x: ``[rows, n]`` logits, ``1 <= n < 2**31``; fp32 or bf16 with stride 1 in the last dimension run
            the compiled kernel, anything else ``torch.max``.

    Returns:
        ``rows`` ints in ``[0, n)``.

    Raises:
        ValueError: ``x`` is not 2-D with 1 to 2**31 - 1 columns.
    """
    if x.dim() != 2 or not 1 <= x.shape[1] < 2**31:
        raise ValueError(f"expected logits [rows, n >= 1], got {tuple(x.shape)}")
    suffix = _SUFFIX.get(x.dtype)
    lib = None if suffix is None or x.device.type != "cpu" or x.stride(1) != 1 else _KERNEL.library()
    if lib is None:
        return x.max(dim=-1).indices.tolist()
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.int64)
    getattr(lib, "argmax_rows" + suffix)(x.data_ptr(), x.stride(0), rows, n, out.data_ptr(), torch.get_num_threads())
    return out.tolist()
