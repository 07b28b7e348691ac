"""fp32 linear layers on the CPU with a fixed order of summation: ``y = x @ W^T (+ b)``, batch-invariant rows.

Each output is one chain of ``fmaf`` over ascending ``k`` from 0, then the bias added once
(``kernels/linear_cpu.c``, built, cached and loaded as :mod:`kernels.c_build` describes, with
``-fopenmp``). ``fmaf`` rounds once, so a row's bits depend only on that row and the weight: not on
how many rows share the call or where the row sits, not on the number of threads (they split the
output columns, each computing whole outputs), and not on the instruction set (AVX-512, AVX2+FMA and
plain x86-64 builds give the same bits), the same guarantee as :mod:`kernels.ordered_matmul`.

The weight is packed once (:class:`PackedWeight`) into panels of :data:`PANEL` output columns,
``[ceil(N / PANEL), K, PANEL]``, zero-padded, which the kernel streams contiguously; register tiles
of up to 12 rows (AVX-512; 3 on AVX2, 4 on plain x86-64) x 32 columns broadcast ``x[m, k]`` against a panel's row ``k``.

Chosen once per process (:func:`backend`): ``"compiled"`` where the C kernel builds and loads,
else ``"torch"`` (no C compiler, an x86 CPU without FMA, or ``PAGEDSERVE_LINEAR_CPU=torch``;
``=compiled`` makes a failed build an error); with ``"torch"``, :func:`linear` raises and the
caller keeps its own path.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kernels._packed_linear import LinearArgs, check_weight, prepare_call
from kernels.c_build import CKernel

ENV_VAR = "PAGEDSERVE_LINEAR_CPU"
_SOURCE = Path(__file__).with_name("linear_cpu.c")
_FLAGS = ("-fopenmp",)
#: Output columns per packed panel (``NP`` in the C file).
PANEL = 32

__all__ = ["PANEL", "PackedWeight", "backend", "build", "compile_kernel", "library", "linear", "load_library"]


def load_library(path: Path) -> ctypes.CDLL:
    """Load a compiled kernel (from :func:`compile_kernel`) and declare its signatures."""
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.linear_cpu.restype = i64
    lib.linear_cpu.argtypes = [ctypes.POINTER(LinearArgs)]
    lib.linear_cpu_pack.restype = None
    lib.linear_cpu_pack.argtypes = [p, i64, i64, i64, p]
    lib.linear_cpu_unpack.restype = None
    lib.linear_cpu_unpack.argtypes = [p, i64, i64, p]
    lib.linear_cpu_panel_width.restype = i64
    lib.linear_cpu_panel_width.argtypes = []
    lib.linear_cpu_pack_x_tiles.restype = i64
    lib.linear_cpu_pack_x_tiles.argtypes = [i64]
    if lib.linear_cpu_panel_width() != PANEL:
        raise OSError(f"{path} packs panels of {lib.linear_cpu_panel_width()} columns, not {PANEL}")
    return lib


_KERNEL = CKernel(_SOURCE, ENV_VAR, load_library, "oneDNN's packed fp32 linear", _FLAGS)
compile_kernel, build, _library, backend = _KERNEL.compile, _KERNEL.build, _KERNEL.library, _KERNEL.backend
#: The loaded library, or None where the fallback runs.
library = _library


def _need_library(library: ctypes.CDLL | None) -> ctypes.CDLL:
    lib = library or _library()
    if lib is None:
        raise RuntimeError(f"the compiled CPU linear is not available here ({ENV_VAR}, or no C compiler)")
    return lib


class PackedWeight:
    """A ``[N, K]`` fp32 weight packed into panels for :func:`linear` (``[ceil(N/32), K, 32]``).

    Args:
        weight: ``[N, K]`` fp32 CPU tensor, stride 1 in ``K`` (read once; not kept).
        library: a compiled kernel (:func:`load_library`) to pack with and to run instead of the
            process's (the tests compare builds for different instruction sets with it).

    Attributes:
        out_features, in_features: ``N`` and ``K``.
        panels: the packed tensor, ``N`` rounded up to 32 columns (``4 * K`` bytes per column).

    Raises:
        ValueError: not a 2-D fp32 CPU tensor with stride 1 in its last dimension, or empty.
        RuntimeError: no compiled kernel in this process.
    """

    def __init__(self, weight: torch.Tensor, library: ctypes.CDLL | None = None):
        n, k = check_weight(weight, torch.float32)
        self.library = _need_library(library)
        self.out_features, self.in_features = n, k
        self.panels = torch.empty(((n + PANEL - 1) // PANEL, k, PANEL), dtype=torch.float32)
        self.library.linear_cpu_pack(weight.data_ptr(), n, k, weight.stride(0), self.panels.data_ptr())
        self._args = LinearArgs(k=k, n=n, w=self.panels.data_ptr())

    def unpack(self) -> torch.Tensor:
        """The ``[N, K]`` weight, in a new contiguous tensor (the same bits as the one packed)."""
        w = torch.empty((self.out_features, self.in_features), dtype=torch.float32)
        self.library.linear_cpu_unpack(self.panels.data_ptr(), self.out_features, self.in_features, w.data_ptr())
        return w


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` in fp32, every output one ``fmaf`` chain over ascending ``k`` (+ bias).

    Args:
        x: ``[M, K]`` fp32 CPU tensor, stride 1 in ``K`` (any row stride).
        weight: the packed ``[N, K]`` weight.
        bias: ``[N]`` fp32 contiguous CPU tensor, or None.

    Returns:
        ``[M, N]`` fp32, contiguous. Threads: up to ``torch.get_num_threads()`` (one for a small
        product); they change no bits.

    Raises:
        ValueError: shapes, dtypes, devices or strides other than the above.
    """
    a, out = prepare_call(x, weight, bias, torch.float32)
    if weight.library.linear_cpu(ctypes.byref(a)):
        raise MemoryError(f"linear_cpu: no memory for a copy of x ({a.m} x {a.k} fp32)")
    return out
