"""Greedy decoding's next token for an fp32 model on the CPU: the LM head's argmax, screened in bf16.

At temperature 0 a step needs one number per sequence, the index of its largest logit, yet the LM
head computes all of them: for SmolLM2-135M 49,152 x 576 multiply-adds per sequence, about an
eighth of a batch-64 fp32 decode step and a sixth of a single stream's (its 113 MB weight
streamed from memory once per step). :class:`GreedyHead` gets the same token from a bf16 product
instead (:mod:`kernels.linear_bf16_cpu` on AVX512-BF16 or AMX: half the bytes, twice the
multiply-adds per instruction) and a rigorous bound on how far each of its logits can be from the
fp32 one; only the tokens whose interval reaches the best lower bound get their fp32 logit
computed, by the very chain of ``fmaf`` that :mod:`kernels.linear_cpu` runs (``kernels/
greedy_head_cpu.c`` has the argument). On SmolLM2's logits that is a handful per sequence.

The token is the fp32 path's bit for bit: ``argmax_rows(linear_cpu.linear(h, W))``, the first of
equal maxima. A row the screen cannot vouch for (a NaN or inf, a magnitude near fp32's range,
more than :data:`MAX_EXACT` candidates) is computed the old way, whole.

The bound, per token ``v`` and row ``h`` (:class:`Bound` holds its constants; the C file derives
it): the bf16 roundings of ``h`` and ``W_v`` enter through the exact identity
``h.W_v - h'.W'_v = h.(W_v - W'_v) + (h - h').W'_v`` and Cauchy-Schwarz (the norms of what the
roundings lost, per row and per token), the fp32 sums of either product in any order through
``gamma_n = n u / (1 - n u)`` (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
2002, ch. 3), the bf16 rounding of the approximate logit through ``2^-8`` of it, plus an absolute
term for the bf16 kernel's flushed denormals.

Costs a bf16 copy of the LM head's weight (57 MB for SmolLM2) beside the fp32 pack, whose columns
the candidates' fp32 logits read. Runs where
this kernel, :mod:`kernels.linear_cpu` and :mod:`kernels.linear_bf16_cpu` all run (:func:`available`);
``PAGEDSERVE_GREEDY_HEAD_CPU=torch`` turns it off (the sampler's full-logits argmax then).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import linear_bf16_cpu, linear_cpu
from kernels.argmax_cpu import argmax_rows
from kernels.c_build import CKernel

ENV_VAR = "PAGEDSERVE_GREEDY_HEAD_CPU"
_SOURCE = Path(__file__).with_name("greedy_head_cpu.c")
#: Rows with more candidates than this are left to the whole fp32 product (far above what a real
#: model's logits give: on SmolLM2, 1 in the median and a few dozen at most).
MAX_EXACT = 2048

__all__ = ["ENV_VAR", "GreedyHead", "MAX_EXACT", "available", "build", "library", "Bound", "bf16_weight", "screen"]


class GreedyHeadArgs(ctypes.Structure):
    """``struct gh_args`` of the C file, field for field."""

    _fields_ = [
        ("m", ctypes.c_int64), ("k", ctypes.c_int64), ("n", ctypes.c_int64),
        ("h", ctypes.c_void_p), ("h_row", ctypes.c_int64),
        ("approx", ctypes.c_void_p), ("approx_row", ctypes.c_int64),
        ("w_norm", ctypes.c_void_p), ("dw_norm", ctypes.c_void_p), ("w_norm_max", ctypes.c_double),
        ("w", ctypes.c_void_p),
        ("g_exact", ctypes.c_double), ("g_approx", ctypes.c_double), ("u_bf16", ctypes.c_double),
        ("abs_err", ctypes.c_double),
        ("max_exact", ctypes.c_int64), ("threads", ctypes.c_int64),
        ("tokens", ctypes.c_void_p), ("exact", ctypes.c_void_p),
    ]


def load_library(path: Path) -> ctypes.CDLL:
    """Load a build of ``greedy_head_cpu.c`` and declare its signature."""
    lib = ctypes.CDLL(str(path))
    lib.greedy_head_cpu.restype = ctypes.c_int64
    lib.greedy_head_cpu.argtypes = [ctypes.POINTER(GreedyHeadArgs)]
    return lib


_KERNEL = CKernel(_SOURCE, ENV_VAR, load_library, "the full fp32 logits", ("-fopenmp",))
build, library, backend = _KERNEL.build, _KERNEL.library, _KERNEL.backend


def available() -> bool:
    """Whether :class:`GreedyHead` runs here: this kernel and both linear kernels built, and the CPU
    has AVX512-BF16 or AMX (decided on first call, which builds what is missing)."""
    return library() is not None and linear_cpu.library() is not None and linear_bf16_cpu.available()


@dataclass(frozen=True)
class Bound:
    """The constants of the screen's error bound for rows of ``k`` terms (``kernels/greedy_head_cpu.c``).

    Attributes:
        g_exact: ``gamma_k`` for the fp32 ``fmaf`` chain (unit roundoff ``2^-24``).
        g_approx: ``gamma`` for the bf16 kernel's fp32 sums, allowed ``2^-23`` per addition (any
            order, any rounding) over ``k`` plus 32 padding terms.
        u_bf16: the unit roundoff of bf16, ``2^-8`` (to nearest even).
        abs_err: the denormals the bf16 kernel flushes to zero, ``2^-126`` per product, sum and
            input (inputs times the largest weight).
        norm_max: ``max_v (||W'_v|| + ||W_v - W'_v||)``, which scales the allowance for the screen's
            own fp32 rounding (computed once per weight, not per call).
    """

    g_exact: float
    g_approx: float
    u_bf16: float
    abs_err: float
    norm_max: float

    @classmethod
    def for_weight(cls, k: int, w_abs_max: float, w_norm: torch.Tensor, dw_norm: torch.Tensor) -> Bound:
        """The constants for a weight of ``k`` columns, its largest magnitude and its row norms (as
        :func:`bf16_weight` returns them)."""
        u32, n = 2.0**-24, k + 32
        return cls(g_exact=k * u32 / (1 - k * u32), g_approx=n * 2.0**-23 / (1 - n * 2.0**-23), u_bf16=2.0**-8,
                   abs_err=(4 * k + 64) * 2.0**-126 * max(1.0, w_abs_max),
                   norm_max=float((w_norm.double() + dw_norm.double()).max()))


#: Rows of the weight processed at a time at start-up: temporaries of a few MB, not of the
#: vocabulary's size (which would stay in the process's peak resident memory).
_SLICE = 1024


def _norms_up(rows: torch.Tensor) -> torch.Tensor:
    """The L2 norm of every row of ``rows`` ``[n, K]``, computed in fp64 and rounded up to fp32 (never
    below the true norm)."""
    exact = torch.linalg.vector_norm(rows.double(), dim=1)
    rounded = exact.float()
    return torch.where(rounded.double() < exact, torch.nextafter(rounded, torch.tensor(float("inf"))), rounded)


def bf16_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(W', ||W'_v||, ||W_v - W'_v||, max |W|)`` for the fp32 ``weight`` ``[N, K]``: ``W'`` its bf16
    rounding (to nearest even) with values below ``2^-126`` flushed to zero (as the bf16 kernel reads
    them), the row norms the screen needs rounded up, and the largest magnitude.

    Raises:
        ValueError: a NaN or inf in ``weight`` (no bound holds).
    """
    n = weight.shape[0]
    wb = torch.empty(weight.shape, dtype=torch.bfloat16)
    norms, deltas = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    largest = 0.0
    with torch.no_grad():
        for i in range(0, n, _SLICE):
            w = weight[i : i + _SLICE]
            if not bool(torch.isfinite(w).all()):
                raise ValueError("the LM head's weight holds a NaN or inf: no bound holds")
            largest = max(largest, float(w.abs().max()))
            b = w.to(torch.bfloat16)
            b[b.abs() < 2.0**-126] = 0
            wb[i : i + _SLICE] = b
            norms[i : i + _SLICE] = _norms_up(b.float())
            deltas[i : i + _SLICE] = _norms_up(w - b.float())
    return wb, norms, deltas, largest


def screen(hidden: torch.Tensor, approx: torch.Tensor, w_norm: torch.Tensor, dw_norm: torch.Tensor,
           pack: linear_cpu.PackedWeight, bound: Bound, max_exact: int = MAX_EXACT) -> tuple[list[int], list[int]]:
    """The screen alone, on given approximate logits (:class:`GreedyHead` feeds it its own).

    Args:
        hidden: ``[M, K]`` fp32 CPU rows ``h``, stride 1 in ``K``.
        approx: ``[M, N]`` bf16 CPU approximate logits, stride 1 in ``N``: ``h`` and ``W'`` (see
            :func:`bf16_weight`) rounded to bf16, multiplied, summed in fp32 and rounded to bf16
            (else the answer may be wrong).
        w_norm, dw_norm: ``[N]`` fp32 contiguous, at least ``||W'_v||`` and ``||W_v - W'_v||``.
        pack: the fp32 weight ``W`` as :mod:`kernels.linear_cpu` packed it (its logits are the reference).
        bound: the error bound's constants for this weight (:meth:`Bound.for_weight`).
        max_exact: a row with more candidates is left over (at least 1).

    Returns:
        ``(tokens, exact)``: per row the argmax of the fp32 logits, or -1 where the row is left to
        the caller; and how many fp32 logits the row computed (0 for one left over).

    Raises:
        ValueError: shapes, dtypes or strides other than the above, or ``max_exact < 1``.
        RuntimeError: the kernel is not built here.
        MemoryError: no memory for the candidates' list.
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"greedy_head_cpu is not available here ({ENV_VAR}, or no C compiler)")
    m, k = hidden.shape if hidden.dim() == 2 else (-1, -1)
    n = pack.out_features
    if (hidden.dtype is not torch.float32 or not hidden.is_cpu or k != pack.in_features or hidden.stride(1) != 1
            or approx.dtype is not torch.bfloat16 or tuple(approx.shape) != (m, n) or approx.stride(1) != 1
            or any(t.dtype is not torch.float32 or tuple(t.shape) != (n,) or not t.is_contiguous()
                   for t in (w_norm, dw_norm))):
        raise ValueError(f"expected hidden [M, {pack.in_features}] fp32, approx [M, {n}] bf16, w_norm and dw_norm "
                         f"[{n}] fp32 "
                         f"(stride 1 in the last dimension), got {tuple(hidden.shape)} {hidden.dtype}, "
                         f"{tuple(approx.shape)} {approx.dtype}, {tuple(w_norm.shape)} {w_norm.dtype}")
    if max_exact < 1:
        raise ValueError(f"max_exact must be at least 1, got {max_exact}")
    tokens = torch.empty(m, dtype=torch.int64)
    exact = torch.empty(m, dtype=torch.int64)
    args = GreedyHeadArgs(m=m, k=k, n=n, h=hidden.data_ptr(), h_row=hidden.stride(0), approx=approx.data_ptr(),
                          approx_row=approx.stride(0), w_norm=w_norm.data_ptr(), dw_norm=dw_norm.data_ptr(),
                          w_norm_max=bound.norm_max, w=pack.panels.data_ptr(), g_exact=bound.g_exact,
                          g_approx=bound.g_approx, u_bf16=bound.u_bf16, abs_err=bound.abs_err, max_exact=max_exact,
                          threads=torch.get_num_threads(), tokens=tokens.data_ptr(), exact=exact.data_ptr())
    if lib.greedy_head_cpu(ctypes.byref(args)):
        raise MemoryError(f"greedy_head_cpu: no memory for {max_exact} candidates per thread")
    return tokens.tolist(), exact.tolist()


class GreedyHead:
    """The LM head's argmax for fp32 hidden states: a bf16 screen, then fp32 logits for the few candidates.

    Args:
        weight: the LM head's ``[N, K]`` fp32 weight (read once: its bf16 copy and row norms are kept).
        pack: the same weight as :mod:`kernels.linear_cpu` packed it (kept, not copied): the
            candidates' fp32 logits read it, so the answer is always that of the logits the pack
            gives (a few KB of strided reads per candidate).

    Attributes:
        exact_logits: fp32 logits computed over all calls so far (for measurements).
        rows_left_over: rows that needed the whole fp32 product.

    Raises:
        ValueError: a weight that is not finite, or whose shape is not the pack's.
        RuntimeError: not :func:`available` here.
    """

    def __init__(self, weight: torch.Tensor, pack: linear_cpu.PackedWeight):
        if not available():
            raise RuntimeError("the screened greedy head does not run here (it needs AVX512-BF16 or AMX and the "
                               f"compiled linear kernels; {ENV_VAR}=torch turns it off)")
        if tuple(weight.shape) != (pack.out_features, pack.in_features):
            raise ValueError(f"weight {tuple(weight.shape)} is not the pack's "
                             f"({pack.out_features}, {pack.in_features})")
        self.pack = pack
        wb, self.w_norm, self.dw_norm, largest = bf16_weight(weight)
        self.approx = linear_bf16_cpu.PackedWeight(wb)
        del wb
        self.bound = Bound.for_weight(weight.shape[1], largest, self.w_norm, self.dw_norm)
        self.exact_logits = 0
        self.rows_left_over = 0

    def tokens(self, hidden: torch.Tensor) -> list[int]:
        """The greedy next token of each row: ``argmax_rows(linear_cpu.linear(hidden, pack))``, the same ints.

        Args:
            hidden: ``[M, K]`` fp32 CPU tensor, stride 1 in ``K``.

        Returns:
            ``M`` token ids.

        Raises:
            ValueError: a shape, dtype or stride other than the above.
        """
        if hidden.dtype is not torch.float32 or hidden.dim() != 2 or hidden.stride(-1) != 1:
            raise ValueError(f"hidden must be [M, {self.pack.in_features}] fp32 with stride 1 in its last "
                             f"dimension, got {tuple(hidden.shape)} {hidden.dtype}")
        approx = linear_bf16_cpu.linear(hidden.to(torch.bfloat16), self.approx)
        tokens, exact = screen(hidden, approx, self.w_norm, self.dw_norm, self.pack, self.bound)
        self.exact_logits += sum(exact)
        left = [i for i, t in enumerate(tokens) if t < 0]
        if left:
            self.rows_left_over += len(left)
            full = argmax_rows(linear_cpu.linear(hidden[left], self.pack))
            for i, t in zip(left, full):
                tokens[i] = t
        return tokens
