"""PagedAttention kernels: Triton implementations and their plain-torch twins.

Every Triton kernel here has a torch twin in :mod:`kernels.torch_ref` with the same signature;
the twins are the CPU path and the reference the kernel tests compare against (together with
dense attention computed without pages).
"""

from kernels.torch_ref import (
    copy_blocks_torch,
    paged_decode_attention_torch,
    paged_extend_attention_torch,
    swap_blocks_torch,
    write_kv_cache_torch,
)

__all__ = [
    "copy_blocks_torch",
    "paged_decode_attention_torch",
    "paged_extend_attention_torch",
    "swap_blocks_torch",
    "write_kv_cache_torch",
]
