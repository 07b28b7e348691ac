"""bf16 linear layers on AMX tiles or AVX512-BF16: ``y = x @ W^T (+ b)``, fp32 sums rounded to bf16 once.

``kernels/linear_bf16_cpu.c`` (built, cached and loaded as :mod:`kernels.c_build` describes, with
``-fopenmp``) multiplies bf16 ``x`` by a bf16 weight packed once (:class:`PackedWeight`) with AMX
tile dot products (``TDPBF16PS``), or on a CPU without AMX (AMD Zen 4 and 5, Intel Cooper Lake) with
AVX512-BF16's ``VDPBF16PS`` on the same packed weight (:func:`isa` says which). Every product of two bf16 numbers is exact in fp32; they are
summed in fp32 (two at a time, as the instruction does; bf16 denormals flushed to zero), the bias
added, and the result rounded to bf16 once (round to nearest even): the rounding points of
``F.linear`` in bf16, in another order of summation. Each output is summed in one order whatever the
number of rows, the row's position or the number of threads (rows are batch-invariant).

Why not oneDNN's packed bf16 product (what :mod:`executor.linear` uses where this kernel cannot
run): at decode sizes it streams the weight at well below the memory's speed and costs ~30 us per
call; this kernel runs a decode step's linear layers in 0.78-0.95x oneDNN's time at 1-96 rows, and
whole prefill steps of up to 1,024 tokens faster too. oneDNN's blocking wins on the products alone
from about 1,500 rows (1.52x at 2,048), but keeping its pack for such steps would hold every
weight twice (docs/bf16.md has the measurements).

The weight layout, ``[ceil(N / 32), K2, 32, 2]``: panels of 32 output columns; row ``kk`` of a panel
holds each column's pair ``W[n, 2kk], W[n, 2kk + 1]`` (AMX's B-operand pair layout);
``K2 = ceil(K / 2)`` rounded up to a multiple of 16 (one tile's depth), zero-padded.

Runs where the CPU has AVX512-BF16 and the kernel builds (:func:`available`), on AMX where the CPU has
AMX-BF16 and Linux grants the process the AMX tile state. The two instruction sets sum each pair of
products in their own way, so their outputs may differ in the last bit; each is batch-invariant.
``PAGEDSERVE_LINEAR_BF16_CPU=torch`` turns it off, and :mod:`executor.linear` keeps oneDNN's path.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from kernels._packed_linear import LinearArgs, check_weight, prepare_call
from kernels.c_build import CKernel

ENV_VAR = "PAGEDSERVE_LINEAR_BF16_CPU"
_SOURCE = Path(__file__).with_name("linear_bf16_cpu.c")
_FLAGS = ("-fopenmp",)
#: Output columns per packed panel (``NP`` in the C file).
PANEL = 32

__all__ = ["ISAS", "PANEL", "PackedWeight", "available", "backend", "build", "isa", "library", "linear", "use_isa"]


def load_library(path: Path) -> ctypes.CDLL:
    """Load a compiled kernel and declare its signatures."""
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.linear_bf16.restype = i64
    lib.linear_bf16.argtypes = [ctypes.POINTER(LinearArgs)]
    lib.linear_bf16_pack.restype = None
    lib.linear_bf16_pack.argtypes = [p, i64, i64, i64, p]
    lib.linear_bf16_unpack.restype = None
    lib.linear_bf16_unpack.argtypes = [p, i64, i64, p]
    for name in ("linear_bf16_panel_width", "linear_bf16_available", "linear_bf16_isa"):
        getattr(lib, name).restype = i64
        getattr(lib, name).argtypes = []
    lib.linear_bf16_use_isa.restype = i64
    lib.linear_bf16_use_isa.argtypes = [i64]
    lib.linear_bf16_packed_pairs.restype = i64
    lib.linear_bf16_packed_pairs.argtypes = [i64]
    if lib.linear_bf16_panel_width() != PANEL:
        raise OSError(f"{path} packs panels of {lib.linear_bf16_panel_width()} columns, not {PANEL}")
    return lib


_KERNEL = CKernel(_SOURCE, ENV_VAR, load_library, "oneDNN's bf16 linear", _FLAGS)
#: ``library()``: the loaded library, or None where oneDNN runs instead.
build, library, backend = _KERNEL.build, _KERNEL.library, _KERNEL.backend


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether :func:`linear` runs here: the kernel built (and is not turned off) and the CPU has
    AVX512-BF16 (decided on first call, which builds the kernel if needed)."""
    lib = library()
    return lib is not None and bool(lib.linear_bf16_available())


#: The instruction sets of :func:`isa`, by the C file's ISA_* codes.
ISAS = {1: "AMX", 2: "AVX512-BF16"}


def isa() -> str | None:
    """``"AMX"`` (tiles, where the CPU has AMX-BF16 and Linux grants the tile state), ``"AVX512-BF16"``
    (elsewhere with AVX512-BF16), or None where :func:`linear` does not run."""
    return ISAS.get(library().linear_bf16_isa()) if available() else None


def use_isa(name: str) -> str | None:
    """Make this process's calls run on ``name`` (a value of :data:`ISAS`) where the CPU can; returns
    :func:`isa` afterwards. For tests and measurements of the AVX512-BF16 path on a CPU with AMX
    (results may differ in the last bit from the AMX path's, so do not switch mid-run).

    Raises:
        ValueError: ``name`` is not one of :data:`ISAS`'s values.
    """
    codes = {v: k for k, v in ISAS.items()}
    if name not in codes:
        raise ValueError(f"unknown instruction set {name!r}: expected one of {sorted(codes)}")
    if available():
        library().linear_bf16_use_isa(codes[name])
    return isa()


class PackedWeight:
    """A ``[N, K]`` bf16 weight packed for :func:`linear` (``[ceil(N/32), K2, 32, 2]``, see the module doc).

    Args:
        weight: ``[N, K]`` bf16 CPU tensor, stride 1 in ``K`` (read once; not kept).

    Attributes:
        out_features, in_features: ``N`` and ``K``.
        panels: the packed tensor (``N`` rounded up to 32 columns, ``K`` to 32).

    Raises:
        ValueError: not a non-empty 2-D bf16 CPU tensor with stride 1 in its last dimension.
        RuntimeError: the kernel does not run here (:func:`available`).
    """

    def __init__(self, weight: torch.Tensor):
        n, k = check_weight(weight, torch.bfloat16)
        if not available():
            raise RuntimeError(f"the bf16 linear kernel does not run here (no AVX512-BF16, no C compiler, "
                               f"or {ENV_VAR}=torch)")
        self.library = library()
        self.out_features, self.in_features = n, k
        pairs = self.library.linear_bf16_packed_pairs(k)
        self.panels = torch.empty(((n + PANEL - 1) // PANEL, pairs, PANEL, 2), dtype=torch.bfloat16)
        self.library.linear_bf16_pack(weight.data_ptr(), n, k, weight.stride(0), self.panels.data_ptr())
        self._args = LinearArgs(k=k, n=n, w=self.panels.data_ptr())

    def unpack(self) -> torch.Tensor:
        """The ``[N, K]`` weight, in a new contiguous tensor (the same bits as the one packed)."""
        w = torch.empty((self.out_features, self.in_features), dtype=torch.bfloat16)
        self.library.linear_bf16_unpack(self.panels.data_ptr(), self.out_features, self.in_features, w.data_ptr())
        return w


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` in bf16 with fp32 sums (see the module doc).

    Args:
        x: ``[M, K]`` bf16 CPU tensor, stride 1 in ``K`` (any row stride).
        weight: the packed ``[N, K]`` weight.
        bias: ``[N]`` bf16 contiguous CPU tensor, or None.

    Returns:
        ``[M, N]`` bf16, contiguous. Threads: up to ``torch.get_num_threads()`` (one for a small product).
        Not safe to call with one ``weight`` from two threads at once (its argument struct is reused).

    Raises:
        ValueError: shapes, dtypes, devices or strides other than the above.
        MemoryError: no memory for the zero-padded copy of (a tail of) ``x`` that AMX's tiles read.
    """
    a, out = prepare_call(x, weight, bias, torch.bfloat16)
    status = weight.library.linear_bf16(ctypes.byref(a))
    if status == 2:
        raise MemoryError(f"linear_bf16: no memory for a zero-padded copy of x (up to {a.m} x {a.k} bf16)")
    if status:
        raise RuntimeError("linear_bf16: neither AMX nor AVX512-BF16 is available here")
    return out
