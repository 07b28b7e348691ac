"""A linear layer whose CPU fp32 rows do not depend on the batch (oneDNN on a packed weight).

See :class:`Linear` and docs/batch-invariance.md for why a token's hidden state must not depend on
how many other tokens share its step, and how the tests check it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


#: Whether this torch has oneDNN's linear kernels (else :class:`Linear` is plain ``F.linear``).
ONEDNN_LINEAR = _onednn_linear_available()
_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default if ONEDNN_LINEAR else None


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU fp32 forward gives every row the same bits whatever the batch.

    ``F.linear`` on the CPU calls MKL's sgemm, which picks its kernel (and so its order of
    summation) by the number of rows: one row, 2-15 rows and 16 or more rows each round
    differently, and with several threads the split of the rows between threads changes it too.
    A token's hidden state would then depend on how many other tokens share its step. Here, on
    the CPU in fp32 without autograd, the product runs in oneDNN on a weight packed once
    (``torch.ops.mkldnn._reorder_linear_weight``; repacked when the weight changes), whose
    rows come out identical for any number of rows from 2 up, at any row position, with 1 to 3
    threads, on oneDNN's AVX2 and AVX-512 kernels alike (an observed property of its blocked
    kernels, not a documented promise: tests/executor/test_cpu_invariance.py checks it on the shapes of
    SmolLM2-135M and Qwen2-0.5B, tests/executor/test_cpu_paths.py under each ``ONEDNN_MAX_CPU_ISA`` and
    ``MKL_CBWR`` path the CPU has, tests/executor/test_batch_invariance.py end to end). A single row is passed as two (a stride-0 expand), since
    oneDNN's one-row path sums in another order. Costs: about 30 us of fixed overhead per call
    (``F.linear``: about 5 us), one-row products done as two-row ones, which cost about the same
    (both stream the weight once), and the packed copy of the weight, as much memory again, unless
    :meth:`drop_plain_weight` frees the original (what :func:`executor.model_loader.load_model`
    does for every weight not shared with another module).

    Elsewhere (CUDA, fp16/bf16 on the CPU, gradients, a torch without oneDNN) it is ``F.linear``
    (on a weight unpacked for the call when the original was dropped).
    Shapes: ``[n, in_features]`` -> ``[n, out_features]`` (other ranks take the ``F.linear`` path).
    """

    _pack: torch.Tensor | None = None
    _pack_key: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ONEDNN_LINEAR and x.dtype is torch.float32 and x.is_cpu and x.dim() == 2 and not torch.is_grad_enabled():
            w = self.weight
            pack = self._pack
            # A dropped weight (meta) cannot change, so its pack stays valid.
            if not w.is_meta and (pack is None or self._pack_key != (w.data_ptr(), w._version)):
                pack = self._repack()
            rows = x.shape[0]
            if pack is not None and rows > 0:
                if rows == 1:
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
        packed (not fp32 on the CPU, or no oneDNN). The caller makes sure no other module shares
        the weight (tied embeddings).
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
        """Pack the weight for oneDNN (None when it is not an fp32 CPU tensor)."""
        w = self.weight
        if w.is_meta:
            return self._pack
        self._pack_key = (w.data_ptr(), w._version)
        self._pack = None
        if w.dtype is torch.float32 and w.is_cpu and (self.bias is None or self.bias.dtype is torch.float32):
            with torch.no_grad():
                self._pack = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 2)
        return self._pack
