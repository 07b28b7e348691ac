"""A linear layer on oneDNN with a weight packed once: batch-invariant fp32 rows, and bf16 on CPUs that have it.

See :class:`Linear` and docs/batch-invariance.md for why a token's hidden state must not depend on
how many other tokens share its step, and how the tests check it; docs/bf16.md for the bf16 path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions: AVX512-BF16 or AMX (whose tiles come with AMX-BF16).

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` alone is not enough: it is also true on plain
    AVX-512 CPUs, where oneDNN emulates bf16 products with fp32 instructions (no faster than fp32).
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


#: Whether this torch has oneDNN's linear kernels (else :class:`Linear` is plain ``F.linear``).
ONEDNN_LINEAR = _onednn_linear_available()
#: Whether bf16 weights are packed for oneDNN's AVX512-BF16 / AMX kernels (else bf16 runs ``F.linear``).
#: oneDNN's own check honours ``ONEDNN_MAX_CPU_ISA`` (false when it is capped at AVX2, where oneDNN
#: refuses to pack bf16 weights).
ONEDNN_BF16_LINEAR = (
    ONEDNN_LINEAR and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and cpu_has_native_bf16()
)
#: The weight dtypes :class:`Linear` packs for oneDNN on the CPU.
PACKED_DTYPES = ((torch.float32,) if ONEDNN_LINEAR else ()) + ((torch.bfloat16,) if ONEDNN_BF16_LINEAR else ())
_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default if ONEDNN_LINEAR else None


def linear_path(dtype: torch.dtype) -> str:
    """How :class:`Linear` multiplies ``dtype`` activations on this CPU, in words (for logs and benchmarks)."""
    if dtype not in PACKED_DTYPES:
        return "F.linear (no packed oneDNN path for this dtype on this CPU)"
    if dtype is torch.float32:
        return "oneDNN fp32, packed weights (batch-invariant rows)"
    # What the CPU has; oneDNN uses it unless ONEDNN_MAX_CPU_ISA caps it lower.
    isa = "AMX" if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else "AVX512-BF16"
    return f"oneDNN bf16 (the CPU has {isa}), packed weights"


class Linear(nn.Linear):
    """``nn.Linear`` on oneDNN with a weight packed once: in fp32 every row gets the same bits whatever the batch.

    **fp32.** ``F.linear`` on the CPU calls MKL's sgemm, which picks its kernel (and so its order of
    summation) by the number of rows: one row, 2-15 rows and 16 or more rows each round
    differently, and with several threads the split of the rows between threads changes it too.
    A token's hidden state would then depend on how many other tokens share its step. Here, on
    the CPU in fp32 without autograd, the product runs in oneDNN on a weight packed once
    (``torch.ops.mkldnn._reorder_linear_weight``; repacked when the weight changes), whose
    rows come out identical for any number of rows from 2 up, at any row position, with 1 to 3
    threads, on oneDNN's AVX2 and AVX-512 kernels alike (an observed property of its blocked
    kernels, not a documented promise: tests/executor/test_cpu_invariance.py checks it on the
    shapes of SmolLM2-135M and Qwen2-0.5B, tests/executor/test_cpu_paths.py under each
    ``ONEDNN_MAX_CPU_ISA`` and ``MKL_CBWR`` path the CPU has, tests/executor/test_batch_invariance.py
    end to end). A single row is passed as two (a stride-0 expand), since oneDNN's one-row path
    sums in another order. Costs: about 30 us of fixed overhead per call
    (``F.linear``: about 5 us), one-row products done as two-row ones, which cost about the same
    (both stream the weight once), and the packed copy of the weight, as much memory again, unless
    :meth:`drop_plain_weight` frees the original (what :func:`executor.model_loader.load_model`
    does for every weight not shared with another module).

    **bf16**, on a CPU with AVX512-BF16 or AMX (:data:`ONEDNN_BF16_LINEAR`): the same packed
    oneDNN product, on oneDNN's bf16 kernels (fp32 accumulation, bf16 output). ``F.linear`` in
    bf16 reaches oneDNN's bf16 matmul too, but on the plain weight, which the kernel copies into
    its blocked layout on every call; packing once saves that (a call of 1-64 rows takes 0.5-0.75x
    the time of ``F.linear`` on SmolLM2's shapes, on a Xeon with AMX).
    Its rows are not batch-invariant (oneDNN's AMX kernels round differently by the number of
    rows), so no one-row expand either; bf16 makes no such claim (docs/bf16.md).

    Elsewhere (CUDA, fp16, bf16 on a CPU without bf16 instructions, gradients, a torch without
    oneDNN, an input whose dtype is not the weight's) it is ``F.linear`` (on a weight unpacked for
    the call when the original was dropped).
    Shapes: ``[n, in_features]`` -> ``[n, out_features]`` (other ranks take the ``F.linear`` path).
    """

    _pack: torch.Tensor | None = None
    _pack_key: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        dtype = x.dtype
        if dtype is w.dtype and dtype in PACKED_DTYPES and x.is_cpu and x.dim() == 2 and not torch.is_grad_enabled():
            pack = self._pack
            # A dropped weight (meta) cannot change, so its pack stays valid.
            if not w.is_meta and (pack is None or self._pack_key != (w.data_ptr(), w._version)):
                pack = self._repack()
            rows = x.shape[0]
            if pack is not None and rows > 0:
                if rows == 1 and dtype is torch.float32:
                    return _LINEAR_POINTWISE(x.expand(2, -1), pack, self.bias, "none", [], "")[:1]
                return _LINEAR_POINTWISE(x, pack, self.bias, "none", [], "")
        return F.linear(x, self.plain_weight(), self.bias)

    def plain_weight(self) -> torch.Tensor:
        """The ``[out_features, in_features]`` weight; unpacked into a new tensor when it was dropped."""
        return self._pack.to_dense() if self.weight.is_meta else self.weight

    def drop_plain_weight(self) -> bool:
        """Free the original weight and keep only the oneDNN-packed one; returns whether it did.

        Afterwards ``weight`` is a meta tensor of the same shape (so it holds no memory and any
        stray use of it fails loudly), the state dict still holds the real weight (unpacked on
        save), and :meth:`restore_plain_weight` brings it back. Does nothing when the weight is not
        packed (a dtype not in :data:`PACKED_DTYPES`, not on the CPU). The caller makes sure no
        other module shares the weight (tied embeddings).
        """
        if self.weight.is_meta or self._repack() is None:
            return False
        self.weight = nn.Parameter(torch.empty_like(self.weight, device="meta"), self.weight.requires_grad)
        return True

    def restore_plain_weight(self) -> None:
        """Undo :meth:`drop_plain_weight` (the pack is rebuilt on the next use); else no-op."""
        if self.weight.is_meta:
            self.weight = nn.Parameter(self._pack.to_dense(), self.weight.requires_grad)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_meta:
            destination[prefix + "weight"] = self.plain_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.restore_plain_weight()  # copying into a meta tensor would silently do nothing
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _repack(self) -> torch.Tensor | None:
        """Pack the weight for oneDNN (None when it is not a CPU tensor of a dtype in :data:`PACKED_DTYPES`)."""
        w = self.weight
        if w.is_meta:
            return self._pack
        self._pack_key = (w.data_ptr(), w._version)
        self._pack = None
        if w.dtype in PACKED_DTYPES and w.is_cpu and (self.bias is None or self.bias.dtype is w.dtype):
            with torch.no_grad():
                self._pack = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 2)
        return self._pack
