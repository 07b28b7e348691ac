"""Helpers shared by the Triton kernel modules: input checks, launch guards, small maths.

Triton kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter. Triton decides
between compiling and interpreting when a kernel is *decorated* (``@triton.jit`` reads
``TRITON_INTERPRET`` then), i.e. when the kernel module is first imported; :func:`is_interpreted`
reports which one a given kernel got.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

try:  # the interpreter's kernel object; absent only in unusual Triton builds
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover
    _InterpretedFunction = None

# Integer dtypes accepted for index tensors (block tables, slot mappings, lengths, offsets).
INDEX_DTYPES = (torch.int32, torch.int64)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` object) runs under the Triton interpreter."""
    return _InterpretedFunction is not None and isinstance(kernel, _InterpretedFunction)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else triton.next_power_of_2(int(n))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_launchable(kernel, name: str, *tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every tensor is on one device that ``kernel`` can run on.

    CUDA tensors run compiled; CPU tensors only under the interpreter (``TRITON_INTERPRET=1`` set
    before :mod:`kernels`' Triton modules were first imported).
    """
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{name}: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu" and is_interpreted(kernel):
        return
    if device.type == "cpu":
        raise ValueError(
            f"{name}: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing "
            f"the kernels) or the plain-torch twin {name}_torch"
        )
    raise ValueError(f"{name}: unsupported device {device}; expected CUDA (or CPU under TRITON_INTERPRET=1)")


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for a launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_dim(name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {what} ({ndim}-D), got shape {tuple(t.shape)}")


def check_index(name: str, t: torch.Tensor) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")


def check_cache_pair(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate a K/V cache pair; return ``(num_blocks, block_size, num_kv_heads, head_dim)``."""
    check_dim("key_cache", key_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} != key_cache shape {tuple(key_cache.shape)}"
        )
    if value_cache.dtype != key_cache.dtype:
        raise ValueError(f"value_cache dtype {value_cache.dtype} != key_cache dtype {key_cache.dtype}")
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    if block_size < 1 or num_kv_heads < 1 or head_dim < 1:
        raise ValueError(f"empty cache dimensions: {tuple(key_cache.shape)}")
    return num_blocks, block_size, num_kv_heads, head_dim


def check_query_heads(query: torch.Tensor, key_cache: torch.Tensor, what: str) -> int:
    """Validate ``query`` ``[n, num_heads, head_dim]`` against the cache; return the GQA group size."""
    check_dim("query", query, 3, what)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, cache_head_dim = key_cache.shape[2], key_cache.shape[3]
    if head_dim != cache_head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if num_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
        )
    if query.dtype != key_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} != cache dtype {key_cache.dtype}")
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {query.dtype}; expected float32, float16 or bfloat16")
    return num_heads // num_kv_heads


def check_block_table(block_table: torch.Tensor, num_seqs: int) -> None:
    check_dim("block_table", block_table, 2, "[num_seqs, max_blocks_per_seq]")
    check_index("block_table", block_table)
    if block_table.shape[0] != num_seqs:
        raise ValueError(f"block_table has {block_table.shape[0]} rows, expected num_seqs={num_seqs}")


def check_seq_lens(seq_lens: torch.Tensor, num_seqs: int, block_table: torch.Tensor, block_size: int) -> None:
    check_dim("seq_lens", seq_lens, 1, "[num_seqs]")
    check_index("seq_lens", seq_lens)
    if seq_lens.shape[0] != num_seqs:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries, expected num_seqs={num_seqs}")
    # Content checks only where they cost no device synchronisation.
    if seq_lens.device.type == "cpu" and num_seqs > 0:
        capacity = block_table.shape[1] * block_size
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < 0:
            raise ValueError(f"seq_lens must be >= 0, got {lo}")
        if hi > capacity:
            raise ValueError(
                f"seq_lens max {hi} exceeds the block table's capacity "
                f"({block_table.shape[1]} blocks x block_size {block_size} = {capacity})"
            )


def use_ieee_dot(dtype: torch.dtype) -> bool:
    """fp32 inputs use exact fp32 dots (not TF32), so fp32 results match the torch twins closely."""
    return dtype == torch.float32


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; 132 (an H100/H200) for non-CUDA devices."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _sm_count(index)
    return 132
