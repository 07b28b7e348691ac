"""Whole-block copies between paged KV caches: copy-on-write (``copy_blocks``) and swap
(``swap_blocks``), after PagedAttention (Kwon et al., SOSP 2023).

On one device both run a Triton kernel with one program per (block pair, chunk of the block);
between devices (swap-out to CPU, swap-in from CPU) ``swap_blocks`` gathers the blocks into one
contiguous buffer, moves it in a single transfer and scatters it, with torch index ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import INDEX_DTYPES, check_dim, device_guard, is_interpreted, next_pow2

#: Elements per program of the copy kernel.
COPY_CHUNK = 2048


@triton.jit
def _copy_blocks_kernel(
    src_ptr,
    dst_ptr,
    mapping_ptr,
    stride_src_block,
    stride_dst_block,
    stride_map_pair,
    stride_map_col,
    BLOCK_NUMEL: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    src_block = tl.load(mapping_ptr + pair * stride_map_pair).to(tl.int64)
    dst_block = tl.load(mapping_ptr + pair * stride_map_pair + stride_map_col).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < BLOCK_NUMEL
    x = tl.load(src_ptr + src_block * stride_src_block + offs, mask=mask)
    tl.store(dst_ptr + dst_block * stride_dst_block + offs, x, mask=mask)


def _block_numel(name: str, cache: torch.Tensor) -> int:
    """Elements per block; requires each block's ``[block_size, num_kv_heads, head_dim]`` dense."""
    check_dim(name, cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    _, block_size, num_kv_heads, head_dim = cache.shape
    if cache.shape[0] > 0 and not cache[0].is_contiguous():
        raise ValueError(f"{name}: each block must be contiguous, got strides {cache.stride()}")
    return block_size * num_kv_heads * head_dim


def _check_mapping(block_mapping: torch.Tensor, num_src_blocks: int, num_dst_blocks: int, same_cache: bool) -> None:
    check_dim("block_mapping", block_mapping, 2, "[num_pairs, 2]")
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must be [num_pairs, 2], got {tuple(block_mapping.shape)}")
    if block_mapping.dtype not in INDEX_DTYPES:
        raise ValueError(f"block_mapping must be int32 or int64, got {block_mapping.dtype}")
    if block_mapping.device.type != "cpu" or block_mapping.shape[0] == 0:
        return  # content checks would need a device sync
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    if int(src.min()) < 0 or int(src.max()) >= num_src_blocks:
        raise ValueError(f"source block id out of range [0, {num_src_blocks})")
    if int(dst.min()) < 0 or int(dst.max()) >= num_dst_blocks:
        raise ValueError(f"destination block id out of range [0, {num_dst_blocks})")
    if dst.unique().numel() != dst.numel():
        raise ValueError("block_mapping has a destination block more than once")
    if same_cache and bool(torch.isin(dst, src).any()):
        raise ValueError("block_mapping uses a block as both source and destination; copy in two steps")


def _launch_copy(src: torch.Tensor, dst: torch.Tensor, mapping: torch.Tensor, block_numel: int) -> None:
    chunk = min(COPY_CHUNK, next_pow2(block_numel))
    grid = (mapping.shape[0], triton.cdiv(block_numel, chunk))
    with device_guard(dst):
        _copy_blocks_kernel[grid](
            src, dst, mapping, src.stride(0), dst.stride(0), *mapping.stride(),
            BLOCK_NUMEL=block_numel, CHUNK=chunk, num_warps=4,
        )  # fmt: skip


def _triton_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and is_interpreted(_copy_blocks_kernel))


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """Copy whole blocks within each layer's caches (copy-on-write), in place, with Triton.

    Twin: ``copy_blocks_torch``. All of a pair's reads happen before its writes; a block may not be
    both a source and a destination in one call (the block manager never asks for that: the
    destination of a copy-on-write is a freshly allocated block).

    Args:
        key_caches, value_caches: one ``[num_blocks, block_size, num_kv_heads, head_dim]`` tensor
            per layer, all on one device, each block contiguous (strides of a dense tensor after
            dim 0).
        block_mapping: ``[num_pairs, 2]`` int64 (or int32) of ``(src_block, dst_block)``, on the
            caches' device or on the CPU (then moved once).

    Raises:
        ValueError: mismatched list lengths or cache shapes, non-contiguous blocks, a malformed
            mapping, out-of-range / duplicate-destination / overlapping block ids (checked when
            the mapping is on the CPU), or CPU caches without the Triton interpreter.
    """
    if len(key_caches) != len(value_caches):
        raise ValueError(f"{len(key_caches)} key caches but {len(value_caches)} value caches")
    caches = [*key_caches, *value_caches]
    if not caches:
        return
    device, shape = caches[0].device, caches[0].shape
    for i, cache in enumerate(caches):
        _block_numel(f"cache {i}", cache)
        if cache.device != device:
            raise ValueError(f"all caches must be on one device, got {device} and {cache.device}")
        if cache.shape[0] != shape[0]:
            raise ValueError(f"all caches must have the same number of blocks, got {shape[0]} and {cache.shape[0]}")
    _check_mapping(block_mapping, shape[0], shape[0], same_cache=True)
    if not _triton_can_run(device):
        raise ValueError(
            f"copy_blocks: caches on {device} need CUDA or the Triton interpreter (TRITON_INTERPRET=1); "
            "use copy_blocks_torch on the CPU"
        )
    if block_mapping.shape[0] == 0:
        return
    mapping = block_mapping.to(device, non_blocking=True)
    for cache in caches:
        _launch_copy(cache, cache, mapping, _block_numel("cache", cache))


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy blocks from one cache to another, in place: swap-out (device -> CPU) and swap-in.

    Twin: ``swap_blocks_torch``. On one device (CUDA, or CPU under the Triton interpreter) a Triton
    kernel copies the blocks; between devices the blocks are gathered with ``index_select``, moved
    in one transfer and scattered with ``index_copy_``. Two CPU caches without the interpreter use
    the same torch index ops.

    Args:
        src_cache, dst_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (block counts may
            differ), same dtype and block shape, each block contiguous.
        block_mapping: ``[num_pairs, 2]`` int64 (or int32) of ``(src_block, dst_block)``.

    Raises:
        ValueError: mismatched dtypes or block shapes, non-contiguous blocks, a malformed mapping,
            out-of-range / duplicate-destination block ids (checked when the mapping is on the CPU).
    """
    src_numel = _block_numel("src_cache", src_cache)
    _block_numel("dst_cache", dst_cache)
    if src_cache.shape[1:] != dst_cache.shape[1:]:
        raise ValueError(f"block shapes differ: {tuple(src_cache.shape[1:])} vs {tuple(dst_cache.shape[1:])}")
    if src_cache.dtype != dst_cache.dtype:
        raise ValueError(f"dtypes differ: {src_cache.dtype} vs {dst_cache.dtype}")
    same = src_cache.data_ptr() == dst_cache.data_ptr() and src_cache.device == dst_cache.device
    _check_mapping(block_mapping, src_cache.shape[0], dst_cache.shape[0], same_cache=same)
    if block_mapping.shape[0] == 0:
        return
    if src_cache.device == dst_cache.device and _triton_can_run(src_cache.device):
        _launch_copy(src_cache, dst_cache, block_mapping.to(src_cache.device, non_blocking=True), src_numel)
        return
    _swap_blocks_across(src_cache, dst_cache, block_mapping)


def _swap_blocks_across(src_cache: torch.Tensor, dst_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """The torch path: gather on the source device, one transfer, scatter on the destination."""
    src = block_mapping[:, 0].to(src_cache.device, torch.int64)
    dst = block_mapping[:, 1].to(dst_cache.device, torch.int64)
    staged = src_cache.index_select(0, src)
    if staged.device != dst_cache.device:
        if staged.device.type == "cpu" and dst_cache.device.type == "cuda":
            staged = staged.pin_memory().to(dst_cache.device, non_blocking=True)
        else:
            staged = staged.to(dst_cache.device)
    dst_cache.index_copy_(0, dst, staged)
