"""PagedAttention kernels: Triton implementations and their plain-torch twins.

Every Triton kernel here has a torch twin in :mod:`kernels.torch_ref` with the same signature;
the twins are the CPU fallback and the reference the kernel tests compare against (together with
dense attention computed without pages). The CPU path's fp32 attention is one compiled call per
layer, :mod:`kernels.paged_attention_cpu`.

The Triton entry points (``write_kv_cache``, ``paged_decode_attention``, ``paged_extend_attention``,
``copy_blocks``, ``swap_blocks``, ``use_split_k``) are imported lazily, on first attribute access,
so that ``import kernels`` does not import Triton, and Triton's choice between compiling and
interpreting (``TRITON_INTERPRET``, read when a kernel module is first imported) is made only when
a kernel is first needed. See docs/kernels.md.
"""

from __future__ import annotations

import importlib

from kernels.torch_ref import (
    copy_blocks_torch,
    paged_decode_attention_torch,
    paged_extend_attention_torch,
    swap_blocks_torch,
    write_kv_cache_torch,
)

_LAZY = {
    "write_kv_cache": "kernels.cache_write",
    "paged_decode_attention": "kernels.decode_attention",
    "use_split_k": "kernels.decode_attention",
    "paged_extend_attention": "kernels.extend_attention",
    "copy_blocks": "kernels.block_copy",
    "swap_blocks": "kernels.block_copy",
}

__all__ = [
    "copy_blocks",
    "copy_blocks_torch",
    "paged_decode_attention",
    "paged_decode_attention_torch",
    "paged_extend_attention",
    "paged_extend_attention_torch",
    "swap_blocks",
    "swap_blocks_torch",
    "use_split_k",
    "write_kv_cache",
    "write_kv_cache_torch",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def triton_interpreted() -> bool:
    """True when every Triton kernel here runs under the Triton interpreter (imports them now)."""
    from kernels import block_copy, cache_write, decode_attention, extend_attention
    from kernels._common import is_interpreted

    return all(
        is_interpreted(k)
        for k in (
            cache_write._write_kv_cache_kernel,
            decode_attention._paged_decode_kernel,
            decode_attention._paged_decode_reduce_kernel,
            extend_attention._paged_extend_kernel,
            block_copy._copy_blocks_kernel,
        )
    )
