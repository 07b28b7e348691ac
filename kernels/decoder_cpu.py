"""Every decoder layer of a CPU forward pass in one C call, over the other CPU kernels' entry points.

``kernels/decoder_cpu.c`` (built, cached and loaded as :mod:`kernels.c_build` describes) runs the
layer loop of :mod:`executor.layers` from C: per layer the residual add + RMSNorm, the q/k/v
projection, RoPE, the KV-cache write and attention, the output projection, the second residual add
+ RMSNorm, gate/up, SiLU * up and down, each by calling the same compiled kernel with the same
arguments as the Python loop does (:mod:`kernels.fused_cpu`, :mod:`kernels.linear_cpu` or
:mod:`kernels.linear_bf16_cpu`, :mod:`kernels.paged_attention_cpu`: their function pointers, taken
from their loaded libraries). It computes nothing itself, so the bits are the Python loop's; what
it saves is ~10 us of interpreter, ctypes and tensor bookkeeping per kernel call, about 270 calls
per step for a 30-layer model. :mod:`executor.decoder_cpu` builds the arguments from a model.

``PAGEDSERVE_DECODER_CPU=torch`` turns it off (the Python loop runs); ``=compiled`` makes a failed
build an error.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from kernels._packed_linear import LinearArgs
from kernels.c_build import CKernel

ENV_VAR = "PAGEDSERVE_DECODER_CPU"
_SOURCE = Path(__file__).with_name("decoder_cpu.c")

__all__ = ["DecoderArgs", "Layer", "backend", "build", "function_pointer", "library"]


class Layer(ctypes.Structure):
    """``struct layer``: one decoder layer's four linear layers, norm weights and KV caches."""

    _fields_ = [(name, LinearArgs) for name in ("qkv", "o", "gate_up", "down")] + [
        (name, ctypes.c_void_p) for name in ("norm1", "norm2", "key_cache", "value_cache")]


class DecoderArgs(ctypes.Structure):
    """``struct decoder_args`` of the C file, field for field (see there)."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "num_layers", "tokens", "threads", "hidden", "heads", "kv_heads", "head_dim", "inter")] + [
        ("eps", ctypes.c_float), ("layers", ctypes.POINTER(Layer))] + [
        (name, ctypes.c_void_p) for name in ("linear", "norm", "rope", "silu", "attention", "attention_args")] + [
        ("key_cache_offset", ctypes.c_int64), ("value_cache_offset", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("e", "n", "qkv", "a", "o", "gu", "act", "d", "cos_", "ssin")] + [
        ("cs_stride", ctypes.c_int64), ("failed_layer", ctypes.c_int64)]


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.decoder_forward.restype = ctypes.c_int64
    lib.decoder_forward.argtypes = [ctypes.POINTER(DecoderArgs)]
    return lib


_KERNEL = CKernel(_SOURCE, ENV_VAR, _load, "the Python layer loop")
build, library, backend = _KERNEL.build, _KERNEL.library, _KERNEL.backend


def function_pointer(fn: ctypes._CFuncPtr) -> int:
    """The address of a function of a loaded library, for a function-pointer field."""
    return ctypes.cast(fn, ctypes.c_void_p).value
