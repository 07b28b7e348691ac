"""What the two packed CPU linear kernels share: their argument struct and the checks around a call.

:mod:`kernels.linear_cpu` (fp32) and :mod:`kernels.linear_bf16_cpu` (bf16 on AMX or AVX512-BF16) take the same
``struct linear_args`` and the same shapes; only the dtype, the packing and the C entry point differ.
"""

from __future__ import annotations

import ctypes

import torch

_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


class LinearArgs(ctypes.Structure):
    """``struct linear_args`` of ``linear_cpu.c`` and ``linear_bf16_cpu.c``, field for field."""

    _fields_ = [(name, ctypes.c_int64) for name in ("m", "k", "n", "x_row", "out_row", "threads")] + [
        (name, ctypes.c_void_p) for name in ("x", "w", "bias", "out")]


def check_weight(weight: torch.Tensor, dtype: torch.dtype) -> tuple[int, int]:
    """``(N, K)`` of a weight to pack; ValueError unless a non-empty 2-D ``dtype`` CPU tensor with stride 1 in K."""
    if weight.dim() != 2 or weight.dtype is not dtype or not weight.is_cpu:
        raise ValueError(f"weight must be a 2-D {_NAMES[dtype]} CPU tensor, got {tuple(weight.shape)} "
                         f"{weight.dtype} {weight.device}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight must not be empty, got {tuple(weight.shape)}")
    if k > 1 and weight.stride(1) != 1:
        raise ValueError(f"weight needs stride 1 in its last dimension, got strides {weight.stride()}")
    return n, k


def prepare_call(x: torch.Tensor, weight, bias: torch.Tensor | None, dtype: torch.dtype) -> tuple[LinearArgs,
                                                                                                  torch.Tensor]:
    """Check ``x`` ``[M, K]`` and ``bias`` ``[N]`` against a packed weight (``out_features``,
    ``in_features``, ``_args``), allocate the ``[M, N]`` output and fill the weight's argument struct.

    Runs for every linear layer of every step: kept to cheap attribute reads.

    Raises:
        ValueError: a dtype, device, shape or stride other than the kernels take.
    """
    if x.dtype is not dtype or not x.is_cpu or x.dim() != 2:
        raise ValueError(f"x must be a 2-D {_NAMES[dtype]} CPU tensor, got {tuple(x.shape)} {x.dtype} {x.device}")
    m, k = x.shape
    n = weight.out_features
    if k != weight.in_features:
        raise ValueError(f"x has {k} features, the weight {weight.in_features}")
    if k > 1 and x.stride(1) != 1:
        raise ValueError(f"x needs stride 1 in its last dimension, got strides {x.stride()}")
    a = weight._args
    if bias is not None:
        if bias.dtype is not dtype or not bias.is_cpu or bias.shape != (n,) or (n > 1 and bias.stride(0) != 1):
            raise ValueError(f"bias must be a contiguous [{n}] {_NAMES[dtype]} CPU tensor, got {tuple(bias.shape)} "
                             f"{bias.dtype}")
        a.bias = bias.data_ptr()
    else:
        a.bias = None
    out = torch.empty((m, n), dtype=dtype)
    a.m, a.x_row, a.out_row, a.threads = m, x.stride(0), n, torch.get_num_threads()
    a.x, a.out = x.data_ptr(), out.data_ptr()
    return a, out
