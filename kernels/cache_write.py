"""Triton cache-write kernel: scatter each new token's K/V into its paged-cache slot.

The slot layout is PagedAttention's (Kwon et al., "Efficient Memory Management for Large Language
Model Serving with PagedAttention", SOSP 2023): token ``t`` goes to block ``slot // block_size``,
row ``slot % block_size`` of ``[num_blocks, block_size, num_kv_heads, head_dim]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (
    check_cache_pair,
    check_dim,
    check_index,
    check_launchable,
    device_guard,
    next_pow2,
)


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token: all its KV heads at once.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
    kc = key_cache_ptr + block * stride_kcb + row * stride_kcs + h[:, None] * stride_kch + d[None, :] * stride_kcd
    vc = value_cache_ptr + block * stride_vcb + row * stride_vcs + h[:, None] * stride_vch + d[None, :] * stride_vcd
    tl.store(kc, k, mask=mask)
    tl.store(vc, v, mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V into their paged-cache slots, in place (Triton; twin: ``write_kv_cache_torch``).

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]``, the caches' dtype; any strides.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``; any strides.
        slot_mapping: ``[num_tokens]`` int64 (or int32), ``block_id * block_size + offset``; a negative
            slot marks a padding token, which is skipped.

    Duplicate slots leave one of the writers' values (unspecified which). On CPU tensors the slots are
    also checked against the cache size; on CUDA that check would need a device sync and is skipped,
    so an out-of-range slot there is undefined behaviour.

    Raises:
        ValueError: mismatched shapes, dtypes or devices, a non-integer ``slot_mapping``, an
            out-of-range slot (CPU only), or CPU tensors without the Triton interpreter.
    """
    num_blocks, block_size, num_kv_heads, head_dim = check_cache_pair(key_cache, value_cache)
    check_dim("key", key, 3, "[num_tokens, num_kv_heads, head_dim]")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    if tuple(key.shape[1:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"key/value [num_tokens, num_kv_heads, head_dim] = {tuple(key.shape)} does not match the cache's "
            f"(num_kv_heads, head_dim) = {(num_kv_heads, head_dim)}"
        )
    if key.dtype != key_cache.dtype or value.dtype != key_cache.dtype:
        raise ValueError(f"key/value dtype {key.dtype}/{value.dtype} != cache dtype {key_cache.dtype}")
    check_dim("slot_mapping", slot_mapping, 1, "[num_tokens]")
    check_index("slot_mapping", slot_mapping)
    num_tokens = key.shape[0]
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries, expected num_tokens={num_tokens}")
    check_launchable(_write_kv_cache_kernel, "write_kv_cache", key, value, key_cache, value_cache, slot_mapping)
    if num_tokens == 0:
        return
    if slot_mapping.device.type == "cpu":
        hi = int(slot_mapping.max())
        if hi >= num_blocks * block_size:
            raise ValueError(f"slot {hi} out of range for a cache of {num_blocks} x {block_size} slots")

    with device_guard(key):
        _write_kv_cache_kernel[(num_tokens,)](
            key,
            value,
            key_cache,
            value_cache,
            slot_mapping,
            *key.stride(),
            *value.stride(),
            *key_cache.stride(),
            *value_cache.stride(),
            NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            BLOCK_H=next_pow2(num_kv_heads),
            BLOCK_D=next_pow2(head_dim),
            num_warps=1 if num_kv_heads * head_dim <= 256 else 4,
        )
