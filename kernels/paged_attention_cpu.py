"""Paged attention on the CPU in one compiled call per layer (fp32 or bf16): cache write and causal attention.

:func:`paged_attention_cpu` writes a step's new K/V into the paged cache (``slot_mapping``) and
computes causal attention for every new token of every sequence (prefill, chunked prefill,
prefix-cache hits and decode alike: ``query_start_loc`` / ``seq_lens`` / ``block_table``), with
grouped-query heads, in one call of ``kernels/paged_attention_cpu.c``. The plain-torch path it
replaces (``kernels.torch_ref``: a cache write and ~46 small operators per layer) stays as the
fallback and as the reference of the tests.

Batch invariance: every output row (token, query head) is computed by one fixed sequence of
fp32 operations that depends only on that row's query and the keys and values it sees: online
softmax (Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018) over chunks of
64 key positions in key order, scores and outputs as ``fmaf`` chains in ascending order, and an
``exp`` built from ``fmaf`` (the C file's header has the details). So a token's bits are the same
alone or in any batch, in any prefill chunk, with any number of threads, on every x86-64 level.
Its bits differ from the plain-torch path's (another softmax), which is as invariant.

bf16 tensors (``--dtype bfloat16``) run the same fp32 arithmetic on their values widened exactly to
fp32, and each output is rounded to bf16 once: a bf16 call's output is the fp32 call's output on
the widened inputs, rounded (so the same invariance, and no bf16 rounding inside the softmax).

The kernel keeps its own cache layout (:func:`cache_shapes`): per block, each KV head's keys
transposed (``key_cache [num_blocks, num_kv_heads, head_dim, block_size]``) and its values in one
run (``value_cache [num_blocks, num_kv_heads, block_size, head_dim]``), so a chunk's keys are
copied into the score tiles as they lie instead of being transposed at every read (vLLM's CPU
backend stores keys transposed too). Block copies and swaps move whole blocks and do not care;
:func:`standard_views` shows such caches in the ``[num_blocks, block_size, num_kv_heads,
head_dim]`` layout of the Triton kernels and the plain-torch twins, for tests and inspection.

Chosen once per process (:func:`backend`): ``"compiled"`` where the C kernel builds and loads (see
:mod:`kernels.c_build`: compiled with ``-fopenmp`` on first use, cached), else ``"torch"``, also
forced by ``PAGEDSERVE_CPU_ATTENTION=torch`` (``=compiled`` makes a failed build an error).
Threads: ``torch.get_num_threads()`` at each call, through OpenMP (the kernel shares torch's
OpenMP runtime where torch uses libgomp, so no second pool of threads competes with it); work
items are (sequence, KV head, up to 64 query rows), split in contiguous ranges, and a call with
little work (a decode of a few short sequences) runs on one thread.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kernels.c_build import CKernel

ENV_VAR = "PAGEDSERVE_CPU_ATTENTION"
_SOURCE = Path(__file__).with_name("paged_attention_cpu.c")
_FLAGS = ("-fopenmp",)

#: The C kernel's error codes (PA_* in the C file) and what they mean.
_ERRORS = {
    1: "query_start_loc must start at 0, not decrease and end at most at num_tokens (sequence {})",
    2: "seq_lens[{0}] is below its query length or beyond its block table row's capacity",
    3: "block_table row {} holds a block id outside the cache",
    4: "slot_mapping[{}] is past the end of the cache",
}


class _Args(ctypes.Structure):
    """``struct pa_args`` of the C file, field for field."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "num_tokens", "num_seqs", "num_heads", "num_kv_heads", "head_dim", "num_blocks", "block_size", "table_width",
        "q_token", "q_head", "k_token", "k_head", "v_token", "v_head", "threads", "error_index", "bf16",
    )] + [("scale", ctypes.c_double)] + [(name, ctypes.c_void_p) for name in (
        "query", "key", "value", "key_cache", "value_cache", "out",
        "slot_mapping", "block_table", "seq_lens", "query_start_loc",
    )]


def load_library(path: Path) -> ctypes.CDLL:
    """Load a compiled kernel (from :func:`compile_kernel`) and declare its signature."""
    lib = ctypes.CDLL(str(path))
    lib.paged_attention_cpu.restype = ctypes.c_int64
    lib.paged_attention_cpu.argtypes = [ctypes.POINTER(_Args)]
    return lib


_KERNEL = CKernel(_SOURCE, ENV_VAR, load_library, "the plain-torch attention (kernels.torch_ref)", _FLAGS)
compile_kernel, build, _library, backend = _KERNEL.compile, _KERNEL.build, _KERNEL.library, _KERNEL.backend
#: The loaded library, or None where the plain-torch attention runs.
library = _library


def cache_pointer_offsets() -> tuple[int, int]:
    """Byte offsets of ``key_cache`` and ``value_cache`` in the kernel's argument struct (a
    :class:`StepLayout`'s ``args``), for a caller that swaps the caches between calls from C
    (:mod:`kernels.decoder_cpu`)."""
    return _Args.key_cache.offset, _Args.value_cache.offset


def error(code: int, index: int) -> Exception:
    """The exception for a nonzero return code of the C kernel: ValueError naming the bad entry of
    the step layout (``index``: its sequence or token), or RuntimeError (out of memory)."""
    if code in _ERRORS:
        return ValueError(_ERRORS[code].format(index))
    return RuntimeError(f"paged_attention_cpu failed with code {code} (out of memory)")


def cache_shapes(num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The shapes of the key and value caches the kernel reads and writes (see the module docstring).

    Returns:
        ``((num_blocks, num_kv_heads, head_dim, block_size), (num_blocks, num_kv_heads, block_size, head_dim))``.
    """
    return (num_blocks, num_kv_heads, head_dim, block_size), (num_blocks, num_kv_heads, block_size, head_dim)


def standard_views(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of caches shaped by :func:`cache_shapes` as ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    No copy: ``key[b, o, h]`` is the key stored at slot ``b * block_size + o`` for KV head ``h``, and
    writing through a view writes the cache.
    """
    return key_cache.permute(0, 3, 1, 2), value_cache.permute(0, 2, 1, 3)


def _check_index(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim or t.dtype not in (torch.int32, torch.int64) or t.device.type != "cpu":
        raise ValueError(f"{name} must be a {ndim}-D int32/int64 CPU tensor, got {tuple(t.shape)} {t.dtype} {t.device}")


class StepLayout:
    """A step's batch layout as the kernel reads it: built once per step, shared by every layer.

    Args:
        slot_mapping: ``[num_tokens]`` int64 (int32 accepted), ``block * block_size + offset``;
            negative = padding, not written.
        block_table: ``[num_seqs, max_blocks_per_seq]`` int32 (int64 accepted); entries past a
            sequence's ``ceil(seq_len / block_size)`` blocks are never read.
        query_start_loc: ``[num_seqs + 1]`` int32 cumulative query lengths from 0.
        seq_lens: ``[num_seqs]`` int32, tokens in the cache per sequence, new tokens included.

    All on the CPU. Their contents are checked by the kernel at each call (a bad entry raises
    ``ValueError`` there, before anything is written).

    Raises:
        ValueError: wrong ranks, dtypes, devices or lengths.
    """

    def __init__(self, slot_mapping: torch.Tensor, block_table: torch.Tensor, query_start_loc: torch.Tensor,
                 seq_lens: torch.Tensor):
        _check_index("slot_mapping", slot_mapping, 1)
        _check_index("block_table", block_table, 2)
        _check_index("query_start_loc", query_start_loc, 1)
        _check_index("seq_lens", seq_lens, 1)
        num_seqs = block_table.shape[0]
        if seq_lens.shape[0] != num_seqs or query_start_loc.shape[0] != num_seqs + 1:
            raise ValueError(f"block_table has {num_seqs} rows, seq_lens {seq_lens.shape[0]} entries and "
                             f"query_start_loc {query_start_loc.shape[0]}: expected num_seqs and num_seqs + 1")
        # Kept referenced: the kernel reads them through their addresses.
        self.slot_mapping = slot_mapping.to(torch.int64).contiguous()
        self.block_table = block_table.to(torch.int32).contiguous()
        self.query_start_loc = query_start_loc.to(torch.int32).contiguous()
        self.seq_lens = seq_lens.to(torch.int32).contiguous()
        self.num_tokens = slot_mapping.shape[0]
        a = self.args = _Args()
        a.num_tokens, a.num_seqs, a.table_width = self.num_tokens, num_seqs, block_table.shape[1]
        a.slot_mapping, a.block_table = self.slot_mapping.data_ptr(), self.block_table.data_ptr()
        a.query_start_loc, a.seq_lens = self.query_start_loc.data_ptr(), self.seq_lens.data_ptr()


def paged_attention_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    layout: StepLayout,
    scale: float,
    library: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """Write this step's K/V into the paged cache, then attend, in one kernel call.

    Sequence ``i`` has ``q_len = query_start_loc[i+1] - query_start_loc[i]`` new tokens at positions
    ``seq_lens[i] - q_len .. seq_lens[i] - 1``; each attends causally to every position up to its
    own (its own K/V included, written by this call). Query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)``.

    Args:
        query: ``[num_tokens, num_heads, head_dim]`` fp32 or bf16, stride 1 in ``head_dim`` (other
            strides free: a slice of a fused projection is read in place).
        key, value: ``[num_tokens, num_kv_heads, head_dim]``, the query's dtype, stride 1 in ``head_dim``.
        key_cache: ``[num_blocks, num_kv_heads, head_dim, block_size]``, value_cache:
            ``[num_blocks, num_kv_heads, block_size, head_dim]`` (:func:`cache_shapes`), the query's
            dtype, contiguous.
        layout: the step's :class:`StepLayout`.
        scale: softmax scale (``head_dim ** -0.5`` for Llama).
        library: a compiled kernel (:func:`load_library`) to use instead of the process's (the tests
            compare builds for different instruction sets with it).

    Returns:
        ``[num_tokens, num_heads, head_dim]`` in the query's dtype; rows of tokens past
        ``query_start_loc[-1]`` are 0.

    Raises:
        ValueError: shapes, dtypes, devices or strides that do not fit; a bad entry in the layout
            (a slot or block id outside the cache, a ``seq_len`` below its query length or beyond
            its block table row, a decreasing ``query_start_loc``).
        RuntimeError: no compiled kernel in this process (:func:`backend` is ``"torch"``), or the
            kernel ran out of memory.
    """
    lib = library or _library()
    if lib is None:
        raise RuntimeError(f"the compiled CPU attention is not available here ({ENV_VAR}, or no C compiler)")
    # Checked once per layer of every step: kept to cheap attribute reads (a few microseconds).
    dtype = query.dtype
    if not ((dtype is torch.float32 or dtype is torch.bfloat16) and key.dtype is dtype and value.dtype is dtype
            and key_cache.dtype is dtype and value_cache.dtype is dtype and query.is_cpu and key.is_cpu
            and value.is_cpu and key_cache.is_cpu and value_cache.is_cpu):
        raise ValueError("the compiled CPU attention takes CPU tensors of one dtype, fp32 or bf16, got "
                         f"{query.dtype}, {key.dtype}, {value.dtype}, {key_cache.dtype}, {value_cache.dtype}")
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3 or key_cache.dim() != 4:
        raise ValueError(f"expected 3-D query/key/value and a 4-D cache, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}, {tuple(key_cache.shape)}")
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, num_kv_heads, cache_head_dim, block_size = key_cache.shape
    kv_shape = key.shape
    if (value_cache.shape != (num_blocks, num_kv_heads, block_size, head_dim) or kv_shape[0] != num_tokens
            or kv_shape[1] != num_kv_heads or kv_shape[2] != head_dim or value.shape != kv_shape
            or cache_head_dim != head_dim or num_tokens != layout.num_tokens):
        raise ValueError(f"shapes do not match: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}, caches {tuple(key_cache.shape)} / {tuple(value_cache.shape)}, "
                         f"slot_mapping {layout.num_tokens} (the caches are laid out as cache_shapes() gives)")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    qs, ks, vs = query.stride(), key.stride(), value.stride()
    if qs[2] != 1 or ks[2] != 1 or vs[2] != 1 or not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("query, key and value need stride 1 in head_dim, and the caches must be contiguous")
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=dtype)
    a = layout.args
    a.num_heads, a.num_kv_heads, a.head_dim = num_heads, num_kv_heads, head_dim
    a.num_blocks, a.block_size = num_blocks, block_size
    a.q_token, a.q_head, a.k_token, a.k_head, a.v_token, a.v_head = qs[0], qs[1], ks[0], ks[1], vs[0], vs[1]
    a.threads, a.scale, a.bf16 = torch.get_num_threads(), scale, dtype is torch.bfloat16
    a.query, a.key, a.value = query.data_ptr(), key.data_ptr(), value.data_ptr()
    a.key_cache, a.value_cache, a.out = key_cache.data_ptr(), value_cache.data_ptr(), out.data_ptr()
    err = lib.paged_attention_cpu(ctypes.byref(a))
    if err:
        raise error(err, a.error_index)
    return out
