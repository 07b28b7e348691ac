"""Paged attention for one model layer: write the step's K/V into the cache, then attend.

Two backends, chosen per executor (:func:`resolve_backend`, the ``--attention-backend`` setting):
``"torch"``, the CPU path, and ``"triton"``, the CUDA path, which uses the Triton kernels (on CPU
tensors only under ``TRITON_INTERPRET=1``, which is how the test suite runs the CUDA path end to
end without a GPU). Both read every key/value from the paged cache, so prefill, chunked prefill,
prefix-cache hits and decode share one code path.

The CPU path runs, for fp32 and bf16 caches, one compiled call per layer (``kernels.paged_attention_cpu``:
cache write and attention together); for fp16 caches, or where that kernel is unavailable (no
C compiler, or ``PAGEDSERVE_CPU_ATTENTION=torch``; a warning is logged once), the plain-torch twins
of ``kernels.torch_ref``. Both keep a token's bits independent of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import kernels
from kernels import paged_attention_cpu
from kernels.paged_attention_cpu import StepLayout
from kernels.torch_ref import ExtendAttentionPlan

BACKENDS = ("triton", "torch")
#: Cache dtypes the compiled CPU attention takes (fp16 runs the plain-torch twins).
COMPILED_CPU_DTYPES = (torch.float32, torch.bfloat16)


def resolve_backend(choice: str, device: torch.device) -> str:
    """The attention backend an executor on ``device`` runs for the setting ``choice``.

    Args:
        choice: ``"auto"`` (Triton on CUDA, torch on the CPU), ``"triton"`` or ``"torch"``.
        device: the KV cache's device.

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: an unknown ``choice``, or ``"triton"`` on the CPU while the Triton kernels are
            compiled rather than interpreted (set ``TRITON_INTERPRET=1`` before the executor starts),
            or ``"torch"`` on CUDA (the twins are CPU reference code).
    """
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"attention backend {choice!r}: expected auto, triton or torch")
    if choice == "triton" and device.type == "cpu" and not kernels.triton_interpreted():
        raise ValueError("attention backend triton on the CPU needs the Triton interpreter: set TRITON_INTERPRET=1 "
                         "in the executor's environment (a correctness check of the CUDA path; use torch to serve)")
    if choice == "torch" and device.type == "cuda":
        raise ValueError("attention backend torch runs on the CPU only; use triton (or auto) with --device cuda")
    return choice


def runs_compiled_cpu_attention(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a KV cache of ``dtype`` on ``device`` is read by the compiled CPU kernel
    (``kernels.paged_attention_cpu``, in its own layout) rather than by the Triton kernels or the
    plain-torch twins: the ``"torch"`` backend, a CPU cache, fp32 or bf16, and the kernel built."""
    return (backend == "torch" and device.type == "cpu" and dtype in COMPILED_CPU_DTYPES
            and paged_attention_cpu.backend() == "compiled")


def kv_cache_shapes(backend: str, device: torch.device, dtype: torch.dtype, num_blocks: int, block_size: int,
                    num_kv_heads: int, head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of one layer's key and value caches for the kernels that will read them.

    ``[num_blocks, block_size, num_kv_heads, head_dim]`` both for the Triton kernels and the
    plain-torch twins; the compiled CPU kernel's blocked layout
    (:func:`kernels.paged_attention_cpu.cache_shapes`) where :func:`runs_compiled_cpu_attention`.
    Either way a block is one contiguous slab of the same size, so block copies and swaps move it whole.
    """
    if runs_compiled_cpu_attention(backend, device, dtype):
        return paged_attention_cpu.cache_shapes(num_blocks, block_size, num_kv_heads, head_dim)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return shape, shape


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", backend: str = "torch",
                      fill: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One ``(key_cache, value_cache)`` pair per layer, shaped by :func:`kv_cache_shapes`, every entry ``fill``."""
    device = torch.device(device)
    key_shape, value_shape = kv_cache_shapes(backend, device, dtype, num_blocks, block_size, num_kv_heads, head_dim)
    return [(torch.full(key_shape, fill, dtype=dtype, device=device),
             torch.full(value_shape, fill, dtype=dtype, device=device)) for _ in range(num_layers)]


def standard_kv_views(key_cache: torch.Tensor, value_cache: torch.Tensor,
                      backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's caches, allocated for ``backend`` (:func:`kv_cache_shapes`), as
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` tensors: views, no copy (for inspection and tests)."""
    if runs_compiled_cpu_attention(backend, key_cache.device, key_cache.dtype):
        return paged_attention_cpu.standard_views(key_cache, value_cache)
    return key_cache, value_cache


@dataclass
class AttentionMetadata:
    """Per-step batch layout shared by every layer.

    Attributes:
        slot_mapping: ``[num_tokens]`` int64, cache slot of each new token (``block * block_size + offset``).
        block_table: ``[num_seqs, max_blocks_per_seq]`` int32 physical block ids (padded with 0).
        seq_lens: ``[num_seqs]`` int32 context length of each sequence after this step's tokens.
        query_start_loc: ``[num_seqs + 1]`` int32 cumulative count of new tokens per sequence.
        max_query_len: the longest run of new tokens of any sequence (1 for a decode-only step).
        backend: ``"triton"`` or ``"torch"`` (:func:`resolve_backend`).
    """

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    backend: str = "torch"
    #: The CPU path's per-step plan, built by the first layer and reused by the others: a
    #: ``kernels.paged_attention_cpu.StepLayout`` (compiled kernel) or a
    #: ``kernels.torch_ref.ExtendAttentionPlan`` (plain torch).
    torch_plan: object | None = field(default=None, repr=False)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store this step's K/V in the paged cache and compute attention for every new token.

    Args:
        query: ``[num_tokens, num_heads, head_dim]``.
        key, value: ``[num_tokens, num_kv_heads, head_dim]``.
        key_cache, value_cache: shaped by :func:`kv_cache_shapes` (the compiled CPU kernel's
            layout when :func:`runs_compiled_cpu_attention`, else ``[num_blocks, block_size,
            num_kv_heads, head_dim]``).
        meta: the step's :class:`AttentionMetadata`.
        scale: softmax scale (``head_dim ** -0.5`` for Llama).

    Returns:
        ``[num_tokens, num_heads, head_dim]``.
    """
    if meta.backend == "triton":
        kernels.write_kv_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        if meta.is_decode_only:
            return kernels.paged_decode_attention(
                query, key_cache, value_cache, meta.block_table, meta.seq_lens, scale
            )
        return kernels.paged_extend_attention(
            query, key_cache, value_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, scale,
            max_query_len=meta.max_query_len,  # known on the host: spares a device sync
        )
    plan = meta.torch_plan
    if plan is None and runs_compiled_cpu_attention(meta.backend, key_cache.device, key_cache.dtype):
        plan = meta.torch_plan = StepLayout(meta.slot_mapping, meta.block_table, meta.query_start_loc, meta.seq_lens)
    if isinstance(plan, StepLayout):
        return paged_attention_cpu.paged_attention_cpu(query, key, value, key_cache, value_cache, plan, scale)
    if plan is None:
        plan = meta.torch_plan = ExtendAttentionPlan.build(
            meta.block_table, meta.query_start_loc, meta.seq_lens, key_cache.shape[1],
            query.shape[1] // key_cache.shape[2],
        )
        plan.slots_valid = bool((meta.slot_mapping >= 0).all())
    if plan.slots_valid:  # the twin's scatter without its per-call check for padding slots
        kvh, head_dim = key_cache.shape[2], key_cache.shape[3]
        key_cache.view(-1, kvh, head_dim).index_copy_(0, meta.slot_mapping, key)
        value_cache.view(-1, kvh, head_dim).index_copy_(0, meta.slot_mapping, value)
    else:
        kernels.write_kv_cache_torch(key, value, key_cache, value_cache, meta.slot_mapping)
    return kernels.paged_extend_attention_torch(
        query, key_cache, value_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, scale,
        plan=meta.torch_plan,
    )
