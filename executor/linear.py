"""The linear layers: fp32 on our own batch-invariant kernel, bf16 on our AMX / AVX512-BF16 kernel (else oneDNN), weights packed once.

See :class:`Linear` and docs/batch-invariance.md for why a token's hidden state must not depend on
how many other tokens share its step, and how the tests check it; docs/kernels.md for the fp32
kernel (:mod:`kernels.linear_cpu`); docs/bf16.md for the bf16 path (:mod:`kernels.linear_bf16_cpu`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from kernels import linear_bf16_cpu, linear_cpu


def _onednn_linear_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions: AVX512-BF16 or AMX (whose tiles come with AMX-BF16).

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` alone is not enough: it is also true on plain
    AVX-512 CPUs, where oneDNN emulates bf16 products with fp32 instructions (no faster than fp32).
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


#: Whether this torch has oneDNN's linear kernels (bf16 below; fp32 where :mod:`kernels.linear_cpu`
#: cannot be built).
ONEDNN_LINEAR = _onednn_linear_available()
#: Whether bf16 weights are packed for oneDNN's AVX512-BF16 / AMX kernels (else bf16 runs ``F.linear``).
#: oneDNN's own check honours ``ONEDNN_MAX_CPU_ISA`` (false when it is capped at AVX2, where oneDNN
#: refuses to pack bf16 weights).
ONEDNN_BF16_LINEAR = (
    ONEDNN_LINEAR and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and cpu_has_native_bf16()
)
#: The weight dtypes :class:`Linear` packs on the CPU: fp32 (:mod:`kernels.linear_cpu`, else oneDNN;
#: :func:`fp32_kernel` says which), and bf16 where :data:`ONEDNN_BF16_LINEAR`.
PACKED_DTYPES = (torch.float32,) + ((torch.bfloat16,) if ONEDNN_BF16_LINEAR else ())
_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default if ONEDNN_LINEAR else None


@lru_cache(maxsize=1)
def fp32_kernel() -> str | None:
    """What multiplies fp32 on the CPU: ``"linear_cpu"`` (:mod:`kernels.linear_cpu`, wherever it builds),
    ``"onednn"`` (where it cannot, or ``PAGEDSERVE_LINEAR_CPU=torch``), or None (neither: ``F.linear``).

    Decided on first call (which builds the C kernel if it is not cached yet).
    """
    if linear_cpu.backend() == "compiled":
        return "linear_cpu"
    return "onednn" if ONEDNN_LINEAR else None


@lru_cache(maxsize=1)
def bf16_own_kernel() -> bool:
    """Whether bf16 calls run on :mod:`kernels.linear_bf16_cpu` (a CPU with AMX-BF16 or AVX512-BF16 where
    oneDNN's bf16 path runs too, the kernel built, not turned off by ``PAGEDSERVE_LINEAR_BF16_CPU=torch``).
    Decided on first call (which builds the kernel if needed)."""
    return ONEDNN_BF16_LINEAR and linear_bf16_cpu.available()


def linear_path(dtype: torch.dtype) -> str:
    """How :class:`Linear` multiplies ``dtype`` activations on this CPU, in words (for logs and benchmarks)."""
    if dtype is torch.float32:
        kernel = fp32_kernel()
        if kernel == "linear_cpu":
            return "kernels.linear_cpu fp32, packed weights (batch-invariant rows)"
        if kernel == "onednn":
            return "oneDNN fp32, packed weights (batch-invariant rows)"
    if dtype not in PACKED_DTYPES or dtype is torch.float32:
        return "F.linear (no packed path for this dtype on this CPU)"
    if bf16_own_kernel():
        return f"kernels.linear_bf16_cpu on {linear_bf16_cpu.isa()}, packed weights (batch-invariant rows)"
    # What the CPU has; oneDNN uses it unless ONEDNN_MAX_CPU_ISA caps it lower.
    isa = "AMX" if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else "AVX512-BF16"
    return f"oneDNN bf16 (the CPU has {isa}), packed weights"


class Linear(nn.Linear):
    """``nn.Linear`` with its CPU weight packed once: in fp32 every row gets the same bits whatever the batch.

    **fp32.** ``F.linear`` on the CPU calls MKL's sgemm, which picks its kernel (and so its order of
    summation) by the number of rows: one row, 2-15 rows and 16 or more rows each round
    differently, and with several threads the split of the rows between threads changes it too.
    A token's hidden state would then depend on how many other tokens share its step. Here, on
    the CPU in fp32 without autograd, the product runs in :func:`kernels.linear_cpu.linear` on a
    weight packed once into column panels (:class:`kernels.linear_cpu.PackedWeight`; repacked when
    the weight changes): every output is one chain of ``fmaf`` over ascending ``k`` (then the bias),
    so its rows are identical for any number of rows, at any row position, with any number of
    threads, on AVX-512, AVX2 and plain x86-64 alike, by construction
    (tests/kernels/test_linear_cpu.py; tests/executor/test_cpu_invariance.py on the shapes of
    SmolLM2-135M and Qwen2-0.5B; tests/executor/test_batch_invariance.py end to end). A call costs
    a few microseconds besides the product (ctypes, an argument struct bound once per weight).
    Where the C kernel cannot be built (no compiler, an x86 CPU without FMA) or
    ``PAGEDSERVE_LINEAR_CPU=torch``, oneDNN's packed fp32 product runs instead
    (``torch.ops.mkldnn._reorder_linear_weight``; :func:`fp32_kernel`), whose rows come out
    identical for any number of rows from 2 up on its AVX2 and AVX-512 kernels (an observed
    property, checked by tests/executor/test_cpu_paths.py), a single row passed as two (a stride-0
    expand) since oneDNN's one-row path sums in another order. Either pack takes as much memory as
    the weight again, unless :meth:`drop_plain_weight` frees the original (what
    :func:`executor.model_loader.load_model` does for every weight not shared with another module).

    **bf16**, on a CPU with AVX512-BF16 or AMX (:data:`ONEDNN_BF16_LINEAR`): fp32 accumulation,
    bf16 output. Where our kernel runs (:func:`bf16_own_kernel`: AMX tiles, or AVX512-BF16's
    VDPBF16PS on a CPU without AMX) every call runs on :mod:`kernels.linear_bf16_cpu`'s
    packed weight, the only copy kept. oneDNN's AMX product is faster on its own from about 1,500
    rows (1.5x at 2,048 rows per layer), but whole steps of up to 1,024 tokens run faster on ours
    (0.71x oneDNN's step time at 128 tokens, 0.88x at 1,024; 1.16x at 2,048; docs/bf16.md), the
    default CPU token budget is 512, and keeping oneDNN's pack beside ours for larger steps would
    hold every weight twice. Where our kernel does not run (turned off, no compiler), oneDNN's packed
    product (``torch.ops.mkldnn._linear_pointwise``) for every call.
    ``F.linear`` in bf16 reaches oneDNN's bf16 matmul too, but on the plain weight, which the kernel
    copies into its blocked layout on every call; packing once saves that (a call of 1-64 rows takes
    0.5-0.75x the time of ``F.linear`` on SmolLM2's shapes, on a Xeon with AMX).
    On our kernel bf16 rows are batch-invariant (each output summed in one order for any number
    of rows, on either instruction set); oneDNN's kernels round differently by the number of rows, so there bf16 makes no such
    claim and gets no one-row expand either (docs/bf16.md).

    Elsewhere (CUDA, fp16, bf16 on a CPU without bf16 instructions, gradients, an input whose
    dtype is not the weight's) it is ``F.linear`` (on a weight unpacked for the call when the
    original was dropped).
    Shapes: ``[n, in_features]`` -> ``[n, out_features]`` (other ranks take the ``F.linear`` path).
    Not safe to call from two threads at once (a packed fp32 weight reuses one argument struct).
    """

    _pack: torch.Tensor | linear_cpu.PackedWeight | linear_bf16_cpu.PackedWeight | None = None
    _pack_key: tuple | None = None
    #: Bumped whenever any Linear packs, drops or restores a weight: whoever holds pointers into
    #: packs (:mod:`executor.decoder_cpu`) rebuilds when it changes.
    generation: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        dtype = x.dtype
        if dtype is w.dtype and dtype in PACKED_DTYPES and x.is_cpu and x.dim() == 2 and not torch.is_grad_enabled():
            pack = self.packed()  # a dropped weight (meta) cannot change, so its pack stays valid
            rows = x.shape[0]
            if pack is not None and rows > 0:
                kind = type(pack)
                if kind is linear_cpu.PackedWeight:
                    return linear_cpu.linear(x, pack, self.bias)
                if kind is linear_bf16_cpu.PackedWeight:
                    return linear_bf16_cpu.linear(x, pack, self.bias)
                if rows == 1 and dtype is torch.float32:
                    return _LINEAR_POINTWISE(x.expand(2, -1), pack, self.bias, "none", [], "")[:1]
                return _LINEAR_POINTWISE(x, pack, self.bias, "none", [], "")
        return F.linear(x, self.plain_weight(), self.bias)

    def packed(self) -> torch.Tensor | linear_cpu.PackedWeight | linear_bf16_cpu.PackedWeight | None:
        """The weight's current pack (repacked first if the weight changed since), or None where it is
        not packed (see :meth:`forward`)."""
        w = self.weight
        if not w.is_meta and self._pack_key != (w.data_ptr(), w._version):
            return self._repack()
        return self._pack

    def plain_weight(self) -> torch.Tensor:
        """The ``[out_features, in_features]`` weight; unpacked into a new tensor when it was dropped."""
        if not self.weight.is_meta:
            return self.weight
        if type(self._pack) in (linear_cpu.PackedWeight, linear_bf16_cpu.PackedWeight):
            return self._pack.unpack()
        return self._pack.to_dense()

    def drop_plain_weight(self) -> bool:
        """Free the original weight and keep only the packed one; returns whether it did.

        Afterwards ``weight`` is a meta tensor of the same shape (so it holds no memory and any
        stray use of it fails loudly), the state dict still holds the real weight (unpacked on
        save), and :meth:`restore_plain_weight` brings it back. Does nothing when the weight is not
        packed (a dtype not in :data:`PACKED_DTYPES`, not on the CPU). The caller makes sure no
        other module shares the weight (tied embeddings).
        """
        if self.weight.is_meta or self._repack() is None:
            return False
        self.weight = nn.Parameter(torch.empty_like(self.weight, device="meta"), self.weight.requires_grad)
        Linear.generation += 1
        return True

    def restore_plain_weight(self) -> None:
        """Undo :meth:`drop_plain_weight` (the pack is rebuilt on the next use); else no-op."""
        if self.weight.is_meta:
            self.weight = nn.Parameter(self.plain_weight(), self.weight.requires_grad)
            Linear.generation += 1

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_meta:
            destination[prefix + "weight"] = self.plain_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.restore_plain_weight()  # copying into a meta tensor would silently do nothing
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _repack(self) -> torch.Tensor | linear_cpu.PackedWeight | linear_bf16_cpu.PackedWeight | None:
        """Pack the weight (None when it is not a CPU tensor of a dtype this CPU packs, see :class:`Linear`)."""
        w = self.weight
        if w.is_meta:
            return self._pack
        self._pack_key = (w.data_ptr(), w._version)
        self._pack = None
        Linear.generation += 1
        if w.dtype in PACKED_DTYPES and w.is_cpu and (self.bias is None or self.bias.dtype is w.dtype):
            if w.dtype is torch.float32:
                kernel = fp32_kernel()
            else:
                kernel = "linear_bf16_cpu" if bf16_own_kernel() else "onednn"
            with torch.no_grad():
                if kernel == "linear_cpu":
                    self._pack = linear_cpu.PackedWeight(w.detach().contiguous())
                elif kernel == "linear_bf16_cpu":
                    self._pack = linear_bf16_cpu.PackedWeight(w.detach().contiguous())
                elif kernel == "onednn":
                    self._pack = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 2)
        return self._pack
