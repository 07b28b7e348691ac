"""Rotary position embedding (RoPE): its parameters from a model config, and its application.

References:
    - RoPE: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021
      (arXiv:2104.09864); transformers' "rotate_half" layout (two halves, not interleaved pairs).
    - Llama 3 RoPE scaling: Meta Llama 3.1 release; formula as in
      ``transformers.modeling_rope_utils._compute_llama3_parameters``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from executor.model_config import UnsupportedModelError, config_value

_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings of ``config`` as one flat dict: ``rope_type``, ``rope_theta`` and scaling keys.

    Reads transformers >= 5 ``config.rope_parameters`` and falls back to the older
    ``config.rope_scaling`` / ``config.rope_theta`` attributes (``rope_theta`` defaults to 10000).
    """
    params: dict[str, Any] = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        for key, value in legacy.items():
            params.setdefault(key, value)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError(f"per-layer-type RoPE parameters are not supported: {sorted(params)}")
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params["rope_theta"] = float(params.get("rope_theta") or config_value(config, "rope_theta", 10000.0))
    return params


def rope_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim // 2]`` fp32 (CPU) and the cos/sin scaling factor.

    ``inv_freq[i] = theta ** (-2i / head_dim)`` (Su et al. 2021). Scaling, following
    ``transformers.modeling_rope_utils``:

    - ``linear`` (position interpolation): ``inv_freq / factor``.
    - ``llama3``: with ``wavelen = 2 pi / inv_freq``, ``L = original_max_position_embeddings``,
      low/high frequency wavelengths ``L / low_freq_factor`` and ``L / high_freq_factor``: long
      wavelengths are divided by ``factor``, short ones kept, and the band between interpolated with
      ``s = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)`` as
      ``(1 - s) * inv_freq / factor + s * inv_freq``.

    The attention scaling factor (multiplied into cos and sin) is 1.0 for all three types.
    """
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    partial = float(params.get("partial_rotary_factor", 1.0) or 1.0)
    if partial != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported")
    base = params["rope_theta"]
    dim = head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim))
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context_len = params.get("original_max_position_embeddings") or config_value(
            config, "original_max_position_embeddings", config.max_position_embeddings
        )
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, inv_freq_llama)
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) applied at absolute positions, rotate_half layout.

    For a head vector ``x`` of size ``D`` at position ``p``: ``x * cos + rotate_half(x) * sin`` with
    ``cos = cos(p * [inv_freq, inv_freq])`` (size ``D``) and ``rotate_half(x) = [-x2, x1]`` where
    ``x1, x2`` are the two halves of ``x``. Angles are computed in fp32, then cast to the
    activations' dtype (as transformers does).

    ``inv_freq`` is a plain attribute, not a buffer: it is computed on the CPU at construction and
    survives building the model on the ``meta`` device; a copy per device is cached on first use.
    """

    def __init__(self, config: Any, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.inv_freq, self.attention_scaling = rope_inv_freq(config, head_dim)
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` each ``[num_tokens, 1, head_dim]`` in ``dtype`` for int64 ``positions [num_tokens]``."""
        inv_freq = self._inv_freq_by_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self.inv_freq.to(positions.device)
            self._inv_freq_by_device[positions.device] = inv_freq
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    @classmethod
    def apply(
        cls, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``query [T, H, D]`` and ``key [T, KVH, D]`` with ``cos``/``sin`` from :meth:`cos_sin`."""
        query = query * cos + cls.rotate_half(query) * sin
        key = key * cos + cls.rotate_half(key) * sin
        return query, key

    @staticmethod
    def signed_sin(sin: torch.Tensor) -> torch.Tensor:
        """``sin`` with its first half negated, for :meth:`rotate`."""
        half = sin.shape[-1] // 2
        return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    @staticmethod
    def rotate(heads: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``heads [T, n, D]`` (query and key heads side by side) in one pass.

        ``signed_sin`` comes from :meth:`signed_sin`. ``roll(x, D/2) * signed_sin`` is
        ``rotate_half(x) * sin`` element by element (``(-a) * s == a * (-s)`` exactly), so the
        result has the same bits as :meth:`apply`, in four operations instead of seven.
        """
        return heads * cos + torch.roll(heads, heads.shape[-1] // 2, dims=-1) * signed_sin

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``query [T, H, D]`` and ``key [T, KVH, D]`` by their tokens' ``positions [T]``."""
        cos, sin = self.cos_sin(positions, query.dtype)
        return self.apply(query, key, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"
