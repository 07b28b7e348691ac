"""The decode step's small operators fused for the CPU: residual add + RMSNorm, RoPE, SiLU * up.

A decode step of a small model on the CPU costs more in operator calls than in arithmetic: each
layer ran ~18 torch operators besides its linear layers and attention (two RMSNorms and residual
adds, RoPE's multiplies, roll and add, SiLU and its product, the views between them), each a few
microseconds of dispatch and Python. Here each of the three groups is one call into
``kernels/fused_cpu.c`` (built, cached and loaded as :mod:`kernels.c_build` describes), working in
place where the operator's input is not needed afterwards, as vLLM's ``fused_add_rms_norm`` does:

- :func:`add_rms_norm`: ``residual = x + residual; x = RMSNorm(residual)`` (Zhang & Sennrich 2019,
  transformers' ``LlamaRMSNorm`` formula ``w * (s * rsqrt(mean(s^2) + eps))``), or the norm alone;
- :func:`rope_rotate_`: the rotate-half RoPE (Su et al. 2021) of the query and key heads in the
  q/k/v projection's output, in place: ``h * cos + roll(h, D/2) * signed_sin``
  (:meth:`executor.rotary.RotaryEmbedding.rotate`, the same bits);
- :func:`silu_and_mul`: ``silu(gate) * up`` from the fused gate/up projection (Shazeer 2020).

Batch invariance holds by construction: every result depends only on its own row, and each row's
sum of squares is added in one order written out in the C source (16 lanes, then the lanes in
turn), compiled without fused multiply-adds, so neither the number of rows nor the SIMD width
changes a bit. The norm's bits differ from torch's ``F.rms_norm`` (another order of summation, a
relative difference of about 1e-7); SiLU's from torch's (its own vectorisable exp against torch's,
about 2e-7 relative). RoPE's are torch's exactly.

bf16 tensors run the same kernels with bf16 loads and stores (``*_bf16`` in the C source): the
arithmetic is fp32, and each result is rounded to bf16 where the torch formula's bf16 operators
round it (the sum ``x + residual``; the normalised row before the bf16 weight and after it; each
RoPE product and their sum; SiLU's result and its product with ``up``). RoPE and the residual sum
are therefore torch's bits exactly; the norm and SiLU differ from torch's only where the fp32
differences above cross a bf16 rounding boundary (one bf16 ulp, in a small share of elements).

The compiled kernels run for fp32 and bf16 CPU tensors; anything else (fp16, CUDA tensors), or a
machine where the library cannot be built, or ``PAGEDSERVE_FUSED_CPU=torch``, runs the torch
formulas (:func:`backend` says which).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.c_build import CKernel

_SOURCE = Path(__file__).with_name("fused_cpu.c")
_ENV = "PAGEDSERVE_FUSED_CPU"
#: On top of kernels.c_build.CFLAGS: lets GCC turn SiLU's clamps into vector selects (it changes no
#: result; the program never traps on floating-point exceptions).
#: -fopenmp: large calls split their rows between torch's threads.
EXTRA_FLAGS = ("-fno-trapping-math", "-fopenmp")

__all__ = ["add_rms_norm", "backend", "build", "library", "load_library", "rope_rotate_", "silu_and_mul"]

#: The dtypes the kernels handle, and the suffix of their C functions for each.
_SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}


def load_library(path: Path) -> ctypes.CDLL:
    """Load a build of ``fused_cpu.c`` and declare its functions' signatures."""
    lib = ctypes.CDLL(str(path))
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    for suffix in _SUFFIX.values():
        for name, argtypes in (("add_rms_norm", [p, i64, p, i64, p, p, i64, i64, i64, f32, i64]),
                               ("rope_rotate", [p, i64, i64, i64, i64, p, p, i64, i64]),
                               ("silu_and_mul", [p, i64, p, i64, i64, i64, i64])):
            fn = getattr(lib, name + suffix)
            fn.restype = None
            fn.argtypes = argtypes
    return lib


_KERNEL = CKernel(_SOURCE, _ENV, load_library, "the torch formulas", EXTRA_FLAGS)
build, backend, library = _KERNEL.build, _KERNEL.backend, _KERNEL.library


def _kernel(name: str, t: torch.Tensor) -> Callable[..., None] | None:
    """The C function ``name`` for ``t``'s dtype when ``t`` is an fp32 or bf16 CPU tensor and the
    library is in use, else None."""
    suffix = _SUFFIX.get(t.dtype)
    if suffix is None or t.device.type != "cpu":
        return None
    lib = _KERNEL.library()
    return None if lib is None else getattr(lib, name + suffix)


def _check_rows(name: str, t: torch.Tensor, rows: int, width: int) -> None:
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] < width or (width > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be [{rows}, >={width}] with stride 1 in its last dimension, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x + residual`` (or of ``x`` when ``residual`` is None), and that sum.

    Args:
        x: ``[T, H]``, stride 1 in ``H``. Overwritten with the normalised rows when ``residual`` is
            given (it is the sum's other term, not needed afterwards).
        residual: ``[T, H]``, stride 1 in ``H``, the same dtype and device, or None. Overwritten
            with ``x + residual``.
        weight: ``[H]`` per-channel scale, contiguous; the compiled kernel runs when it has ``x``'s
            dtype (the model's norm weights do).
        eps: added to the mean square.

    Returns:
        ``(normed, residual)``: ``normed = weight * (s * rsqrt(mean(s^2) + eps))`` with ``s`` the
        sum (or ``x``); ``residual`` is ``s`` (``x`` itself when no residual was given). The
        statistic is fp32 in every dtype; in bf16 the normalised row is rounded to bf16 before the
        weight, as transformers' ``LlamaRMSNorm``. In fp32 and bf16 on the CPU these are ``x`` and
        ``residual`` overwritten (a new ``normed`` without residual); elsewhere new tensors.

    Raises:
        ValueError: shapes or strides other than the above (compiled path).
    """
    kernel = _kernel("add_rms_norm", x)
    if kernel is None or weight.dtype is not x.dtype:
        s = x if residual is None else x + residual
        if s.dtype is torch.float32:
            return F.rms_norm(s, (s.shape[-1],), weight, eps), s
        s32 = s.to(torch.float32)
        return weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype), s
    rows, width = x.shape[0], weight.shape[0]
    _check_rows("x", x, rows, width)
    if weight.dim() != 1 or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [H], got shape {tuple(weight.shape)}")
    if residual is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        kernel(x.data_ptr(), x.stride(0), None, 0, weight.data_ptr(), out.data_ptr(), out.stride(0), rows, width, eps,
               torch.get_num_threads())
        return out, x
    if residual.dtype is not x.dtype or residual.device.type != "cpu":
        raise ValueError(f"residual must be a {x.dtype} CPU tensor like x, got {residual.dtype} on {residual.device}")
    _check_rows("residual", residual, rows, width)
    kernel(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0), weight.data_ptr(), x.data_ptr(),
           x.stride(0), rows, width, eps, torch.get_num_threads())
    return x, residual


def rope_rotate_(x: torch.Tensor, num_heads: int, head_dim: int, cos: torch.Tensor,
                 signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``num_heads`` head vectors of each row of ``x`` in place; returns ``x``.

    Args:
        x: ``[T, >= num_heads * head_dim]``, stride 1 in its last dimension (e.g. the q/k/v
            projection's output, query then key heads first).
        num_heads: head vectors to rotate per row.
        head_dim: even.
        cos, signed_sin: ``[T, 1, head_dim]`` (or ``[T, head_dim]``) in ``x``'s dtype, stride 1 in
            the last dimension, equal strides; :meth:`executor.rotary.RotaryEmbedding.cos_sin` and
            :meth:`~executor.rotary.RotaryEmbedding.signed_sin`.

    In bf16 each product and the sum are rounded to bf16, as torch's bf16 operators round them.

    Raises:
        ValueError: an odd ``head_dim``, or shapes and strides other than the above (compiled path).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    kernel = _kernel("rope_rotate", x)
    if kernel is None:
        heads = x[:, : num_heads * head_dim].view(x.shape[0], num_heads, head_dim)
        heads.copy_(heads * cos + torch.roll(heads, head_dim // 2, dims=-1) * signed_sin)
        return x
    rows = x.shape[0]
    _check_rows("x", x, rows, num_heads * head_dim)
    for name, t in (("cos", cos), ("signed_sin", signed_sin)):
        if t.dtype is not x.dtype or t.device.type != "cpu" or t.shape[0] != rows \
                or t.shape[-1] != head_dim or t.stride(-1) != 1 or t.numel() != rows * head_dim:
            raise ValueError(f"{name} must be a {x.dtype} CPU tensor [T, 1, head_dim] or [T, head_dim] with stride 1 "
                             f"in the last dimension, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if cos.stride(0) != signed_sin.stride(0):
        raise ValueError(f"cos and signed_sin need equal strides, got {cos.stride()} and {signed_sin.stride()}")
    kernel(x.data_ptr(), x.stride(0), rows, num_heads, head_dim, cos.data_ptr(), signed_sin.data_ptr(), cos.stride(0),
           torch.get_num_threads())
    return x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` ``[T, I]`` from ``gate_up = cat(gate, up)`` ``[T, 2I]`` (stride 1 in the last dim).

    ``silu(g) = g / (1 + exp(-g))``, in fp32; in bf16 it is rounded to bf16 before the product, as
    torch's ``F.silu`` then ``*`` round. Raises ValueError for an odd width or a bad layout (compiled path).
    """
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension must be even, got {gate_up.shape[-1]}")
    inter = gate_up.shape[-1] // 2
    kernel = _kernel("silu_and_mul", gate_up)
    if kernel is None:
        gate, up = gate_up.split(inter, dim=-1)
        return F.silu(gate) * up
    rows = gate_up.shape[0]
    _check_rows("gate_up", gate_up, rows, 2 * inter)
    out = torch.empty((rows, inter), dtype=gate_up.dtype)
    kernel(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), inter, rows, inter, torch.get_num_threads())
    return out
