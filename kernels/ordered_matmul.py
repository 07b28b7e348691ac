"""Batched fp32 products with a fixed order of summation: the CPU attention's matrix products.

``out[i, m, n] = sum_k a[i, m, k] * b[i, k, n]`` where each output is summed in a way that
depends only on the numbers that enter it, never on how many rows share the call, where a row
sits, or which instruction set the CPU offers. BLAS libraries give no such promise: MKL's sgemm
picks its kernel, and so its summation order, by the matrix shapes and by the CPU (its AVX2 path,
which AMD processors get, rounds a one-row product differently from a 300-row one).

Two implementations, chosen once per process (:func:`backend`):

- ``"compiled"``: ``kernels/ordered_matmul.c``, compiled on first use and loaded by
  :mod:`kernels.c_build`. Each output is one chain of ``fmaf`` over ascending ``k`` from 0;
  ``fmaf`` rounds once (IEEE 754 fusedMultiplyAdd), so every SIMD width, and the scalar tail,
  gives the same bits. Large products are split between up to
  ``torch.get_num_threads()`` threads by whole outputs, which changes no bits either.
- ``"torch"``: used where no C compiler works, on an x86 CPU without FMA (where ``fmaf`` is a slow
  library call), or when ``PAGEDSERVE_ORDERED_MATMUL=torch``. Each product is an elementwise
  multiply and a sum over the last dimension, of ``K2`` (fixed: 64 keys or head_dim) values, whose
  order ATen fixes by that length and its CPU capability; the ``K1`` partial sums are added in
  order by ``cumsum`` (a sequential scan). Bits differ from the compiled backend's, but are as
  independent of the batch. Slower for prefill (it materializes every product).

The reduction runs over ``k = k1 * K2 + k2`` (two levels, so a product can sum over several
separately stored key chunks in order).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kernels.c_build import CKernel, kernel_cache_dir

_SOURCE = Path(__file__).with_name("ordered_matmul.c")
#: Above this many elements, the torch backend splits a product's rows to bound its temporary.
_TORCH_MAX_ELEMENTS = 1 << 22

__all__ = ["OrderedMatmul", "backend", "build", "kernel_cache_dir", "load_library"]


def load_library(path: Path) -> ctypes.CDLL:
    """Load a compiled kernel (from :func:`_compile`) and declare its signature."""
    lib = ctypes.CDLL(str(path))
    lib.ordered_matmul.restype = None
    lib.ordered_matmul.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64]
    return lib


_KERNEL = CKernel(_SOURCE, "PAGEDSERVE_ORDERED_MATMUL", load_library, "the slower torch backend")
_compile, build, _library, backend = _KERNEL.compile, _KERNEL.build, _KERNEL.library, _KERNEL.backend


class OrderedMatmul:
    """One product, bound to its tensors once and run any number of times (e.g. once per layer).

    Args:
        a: ``[B0, B1, B2, M, K1, K2]`` view (any strides, 0 included).
        b: ``[B0, B1, B2, K1, K2, N]`` view, stride 1 in ``N``.
        out: ``[B0, B1, B2, M, N]``, stride 1 in ``N``; written by :meth:`__call__`.
        rowsum: optional ``[B0, B1, B2, M]``, receives ``sum_k a[..., m, k]`` (in order).
        library: a compiled kernel (:func:`load_library`) to use instead of the process's
            :func:`backend` (the tests compare builds for different instruction sets with it).
        use_torch: run the torch implementation whatever the backend.

    All four share one dtype and device. fp32 CPU tensors use :func:`backend`; anything else (the
    CUDA reference, other dtypes) the torch implementation.

    The tensors must stay alive and in place while the object is used: only their addresses and
    strides are kept (the inputs' contents are read at each call).

    Raises:
        ValueError: shapes that do not match, mixed dtypes or devices, or a stride other than 1
            in ``N``.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, rowsum: torch.Tensor | None = None,
                 library: ctypes.CDLL | None = None, use_torch: bool = False):
        if a.dim() != 6 or b.dim() != 6 or out.dim() != 5:
            raise ValueError(f"expected a 6-d a and b and a 5-d out, got {a.dim()}, {b.dim()}, {out.dim()}")
        b0, b1, b2, m, k1, k2 = a.shape
        n = b.shape[-1]
        if tuple(b.shape) != (b0, b1, b2, k1, k2, n) or tuple(out.shape) != (b0, b1, b2, m, n):
            raise ValueError(f"shapes do not match: a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)}")
        if rowsum is not None and tuple(rowsum.shape) != (b0, b1, b2, m):
            raise ValueError(f"rowsum must be {(b0, b1, b2, m)}, got {tuple(rowsum.shape)}")
        tensors = [t for t in (a, b, out, rowsum) if t is not None]
        if len({(t.dtype, t.device) for t in tensors}) != 1:
            raise ValueError("a, b, out and rowsum need one dtype and device")
        if n > 1 and (b.stride(-1) != 1 or out.stride(-1) != 1):
            raise ValueError("b and out need stride 1 in their last dimension")
        self.a, self.b, self.out, self.rowsum = a, b, out, rowsum
        self._args = None
        self._library = None if use_torch else library or _library()
        if a.dtype == torch.float32 and a.device.type == "cpu" and self._library is not None:
            i64 = ctypes.c_int64
            arrays = (
                (i64 * 7)(b0, b1, b2, m, k1, k2, n),
                (i64 * 6)(*a.stride()),
                (i64 * 5)(*b.stride()[:5]),
                (i64 * 4)(*out.stride()[:4]),
                (i64 * 4)(*(rowsum.stride() if rowsum is not None else (0, 0, 0, 0))),
            )
            ptrs = [t.data_ptr() if t is not None else None for t in (a, b, out, rowsum)]
            self._args = (*arrays, *ptrs)

    def __call__(self) -> None:
        if self._args is not None:
            self._library.ordered_matmul(*self._args, torch.get_num_threads())
            return
        a, b, out, rowsum = self.a, self.b, self.out, self.rowsum
        b0, b1, b2, m, k1, k2 = a.shape
        n = b.shape[-1]
        bt = b.permute(0, 1, 2, 5, 3, 4).unsqueeze(3)  # [B0, B1, B2, 1, N, K1, K2]
        step = max(1, _TORCH_MAX_ELEMENTS // max(1, b0 * b1 * b2 * n * k1 * k2))
        for m0 in range(0, m, step):
            rows = slice(m0, min(m, m0 + step))
            # A contiguous product, so the sum below is over K2 contiguous values whatever the
            # shapes (torch would otherwise pick the temporary's layout from the inputs' strides).
            prod = torch.empty((b0, b1, b2, rows.stop - m0, n, k1, k2), dtype=a.dtype, device=a.device)
            torch.mul(a[:, :, :, rows].unsqueeze(4), bt, out=prod)
            out[:, :, :, rows] = _in_order(prod.sum(-1))
        if rowsum is not None:
            rowsum.copy_(_in_order(a.contiguous().sum(-1)))


def _in_order(partials: torch.Tensor) -> torch.Tensor:
    """``partials[..., 0] + partials[..., 1] + ...`` left to right (CPU ``cumsum`` is a scan)."""
    return partials.cumsum(-1)[..., -1] if partials.shape[-1] > 1 else partials[..., 0]
