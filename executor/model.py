"""Our own forward pass for Llama-family decoder-only models, on a paged KV cache.

Supported families (``config.model_type``): ``llama`` (Llama 2/3, SmolLM2, TinyLlama, ...),
``mistral`` and ``qwen2``. They share one block structure and differ only in details the config
spells out (q/k/v bias, head_dim, RoPE parameters, tied embeddings). transformers is used for its
config classes only; none of its modeling code runs here.

Token layout is vLLM's flattened batch: no padding and no batch dimension. The new tokens of all
scheduled sequences lie back to back in one ``[num_tokens]`` vector; ``positions`` gives each
token's absolute position in its own sequence, and :class:`~executor.attention.AttentionMetadata`
says which tokens belong to which sequence and where their K/V go in the paged cache.

One decoder layer (pre-norm residual blocks)::

    h = x + o_proj(PagedAttention(RoPE(q_proj(n1)), RoPE(k_proj(n1)), v_proj(n1)))   n1 = RMSNorm(x)
    y = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))                            n2 = RMSNorm(h)

References:
    - RMSNorm: Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    - RoPE: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021
      (arXiv:2104.09864); transformers' "rotate_half" layout (two halves, not interleaved pairs).
    - Llama 3 RoPE scaling: Meta Llama 3.1 release; formula as in
      ``transformers.modeling_rope_utils._compute_llama3_parameters``.
    - SwiGLU: Shazeer, "GLU Variants Improve Transformer", 2020 (arXiv:2002.05202).
    - Grouped-query attention: Ainslie et al., "GQA: Training Generalized Multi-Query Transformer
      Models from Multi-Head Checkpoints", EMNLP 2023.
    - PagedAttention: Kwon et al., SOSP 2023.

Weights use vLLM's fused layout: ``qkv_proj`` is ``cat(q_proj, k_proj, v_proj)`` along the output
dimension and ``gate_up_proj`` is ``cat(gate_proj, up_proj)``: one matmul each instead of three and
two. :meth:`LlamaForCausalLM.load_weights` maps Hugging Face checkpoint names onto them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from executor.attention import AttentionMetadata, paged_attention

logger = logging.getLogger("pagedserve.executor")

#: ``config.model_type`` values this module runs, and the checkpoint class name of each.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
#: ``config.architectures`` entries accepted (the inverse view of :data:`SUPPORTED_MODEL_TYPES`).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(SUPPORTED_MODEL_TYPES.values())

_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The config describes a model this executor cannot run."""


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, None)
    return default if value is None else value


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): ``w * x / sqrt(mean(x^2) + eps)``.

    The statistic is computed in fp32 and the normalised activations are cast back to the input
    dtype before the (learned, per-channel) scale, exactly as transformers' ``LlamaRMSNorm``.

    Shapes: ``[..., hidden_size]`` in, same shape and dtype out.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype is torch.float32:
            # torch's rms_norm: the same operations in one call (bit-identical, checked in tests).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _onednn_linear_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_linear_available()
_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default if _ONEDNN else None


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
        if _ONEDNN and x.dtype is torch.float32 and x.is_cpu and x.dim() == 2 and not torch.is_grad_enabled():
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
    params["rope_theta"] = float(params.get("rope_theta") or _cfg(config, "rope_theta", 10000.0))
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
        old_context_len = params.get("original_max_position_embeddings") or _cfg(
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


class Attention(nn.Module):
    """Grouped-query self-attention (Ainslie et al. 2023) over the paged KV cache.

    ``num_heads`` query heads share ``num_kv_heads`` key/value heads (query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)``). Softmax scale ``head_dim ** -0.5``.
    """

    def __init__(self, config: Any, head_dim: int, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = _cfg(config, "num_key_value_heads", self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        hidden = config.hidden_size
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, hidden, bias=o_bias)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        hidden_states: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``hidden_states [T, hidden]`` -> ``[T, hidden]``; writes this step's K/V into ``kv_cache``.

        ``rope`` is ``(cos, signed_sin)``, each ``[T, 1, head_dim]``, from
        :meth:`RotaryEmbedding.cos_sin` and :meth:`RotaryEmbedding.signed_sin`.
        """
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj.forward(hidden_states)
        qk_size = self.q_size + self.kv_size
        # Query and key heads rotated together (one set of elementwise passes instead of two).
        qk = qkv[:, :qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = RotaryEmbedding.rotate(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        out = paged_attention(q, k, v, key_cache, value_cache, meta, self.scale)
        return self.o_proj.forward(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``; gate and up fused."""

    def __init__(self, config: Any, bias: bool) -> None:
        super().__init__()
        act = _cfg(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only silu / SwiGLU)")
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate_size, bias=bias)
        self.down_proj = Linear(self.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.forward(x).split(self.intermediate_size, dim=-1)
        return self.down_proj.forward(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``h = x + attn(norm1(x)); y = h + mlp(norm2(h))``."""

    def __init__(self, config: Any, head_dim: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> None:
        super().__init__()
        eps = float(_cfg(config, "rms_norm_eps", 1e-6))
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Attention(config, head_dim, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config, mlp_bias)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        hidden_states: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn.forward(rope, self.input_layernorm.forward(hidden_states), kv_cache, meta)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp.forward(self.post_attention_layernorm.forward(hidden_states))
        return residual + hidden_states


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def check_supported(config: Any) -> str:
    """Return ``config.model_type`` if this module can run it, else raise :class:`UnsupportedModelError`."""
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    supported = ", ".join(f"{a} ({t})" for t, a in SUPPORTED_MODEL_TYPES.items())
    raise UnsupportedModelError(
        f"unsupported model architecture: model_type={model_type!r}, architectures={archs}; "
        f"supported: {supported}"
    )


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 causal LM over a paged KV cache (flattened token batch).

    Args:
        config: a transformers ``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config`` (or any
            object with the same attributes).

    Attributes:
        config: the config it was built from.
        num_layers, num_heads, num_kv_heads, head_dim, hidden_size, vocab_size: model shape.
        max_model_len: longest sequence (prompt + output) it runs: ``max_position_embeddings``,
            capped at ``sliding_window`` when the model uses sliding-window attention (our paged
            attention is full causal attention, which equals sliding-window attention only while a
            sequence fits in the window).

    Parameters are created in the default dtype/device (use ``torch.device("meta")`` and
    ``to_empty`` to skip initialisation, as :func:`executor.model_loader.load_model` does).
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        model_type = check_supported(config)
        self.config = config
        self.model_type = model_type
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = _cfg(config, "num_key_value_heads", self.num_heads)
        self.head_dim = _cfg(config, "head_dim", self.hidden_size // self.num_heads)
        self.vocab_size = config.vocab_size
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.max_model_len = int(config.max_position_embeddings)
        window = self._sliding_window(config)
        if window is not None and window < self.max_model_len:
            logger.warning(
                "model uses sliding-window attention (window %d); max_model_len capped from %d to %d",
                window, self.max_model_len, window,
            )
            self.max_model_len = window

        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            attn_bias = bool(getattr(config, "attention_bias", False))
            qkv_bias, o_bias = attn_bias, attn_bias
            mlp_bias = bool(getattr(config, "mlp_bias", False))

        self.embed_tokens = nn.Embedding(self.vocab_size, self.hidden_size)
        self.rotary_emb = RotaryEmbedding(config, self.head_dim)  # shared by all layers
        self.layers = nn.ModuleList(
            DecoderLayer(config, self.head_dim, qkv_bias, o_bias, mlp_bias) for _ in range(self.num_layers)
        )
        self.norm = RMSNorm(self.hidden_size, float(_cfg(config, "rms_norm_eps", 1e-6)))
        self.lm_head = Linear(self.hidden_size, self.vocab_size, bias=False)
        self.tie_weights()

    def pack_weights(self, keep_plain: bool = True) -> int:
        """Pack every CPU fp32 linear weight for oneDNN now (see :class:`Linear`); returns how many.

        Otherwise each is packed on its first use, in the first forward pass. Packing again after
        the weights change happens by itself.

        Args:
            keep_plain: keep each original weight beside its packed copy. False frees the
                originals (:meth:`Linear.drop_plain_weight`), halving the linear layers' memory,
                except a tied LM head's, which is also the embedding table. Then the weights change
                only through :meth:`load_weights` or ``load_state_dict``, which bring them back.
        """
        packed = 0
        for module in self.modules():
            if isinstance(module, Linear) and _ONEDNN and module._repack() is not None:
                packed += 1
                if not keep_plain and module.weight is not self.embed_tokens.weight:
                    module.drop_plain_weight()
        return packed

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with the embedding when ``tie_word_embeddings`` (again after ``to_empty``)."""
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def _sliding_window(config: Any) -> int | None:
        window = getattr(config, "sliding_window", None)
        if not window:
            return None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        if getattr(config, "use_sliding_window", True) is False:
            return None
        return int(window)

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Run every layer over one step's new tokens.

        Args:
            input_ids: ``[num_tokens]`` int64, the new tokens of all sequences back to back.
            positions: ``[num_tokens]`` int64, each token's absolute position in its sequence.
            kv_caches: one ``(key_cache, value_cache)`` per layer, each
                ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the model's dtype; this
                step's K/V are written at ``meta.slot_mapping``.
            meta: the step's batch layout (see :class:`~executor.attention.AttentionMetadata`).

        Returns:
            ``[num_tokens, hidden_size]`` final hidden states (after the last RMSNorm), model dtype.
        """
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} (key_cache, value_cache) pairs, got {len(kv_caches)}")
        hidden_states = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(positions, hidden_states.dtype)
        rope = (cos, RotaryEmbedding.signed_sin(sin))
        for layer, kv_cache in zip(self.layers, kv_caches):
            # .forward: the per-layer modules skip nn.Module.__call__ (hooks are not supported
            # inside the model; a decode step makes ~300 such calls).
            hidden_states = layer.forward(rope, hidden_states, kv_cache, meta)
        return self.norm.forward(hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states [n, hidden_size]`` -> logits ``[n, vocab_size]`` in fp32."""
        return self.lm_head(hidden_states).float()

    # -- weights --------------------------------------------------------------------------------

    _LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    # HF name within a layer -> (our parameter path within the layer, shard index into the fused tensor).
    _FUSED = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0),
        "self_attn.k_proj": ("self_attn.qkv_proj", 1),
        "self_attn.v_proj": ("self_attn.qkv_proj", 2),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", 1),
    }

    def _shard_ranges(self, fused: str) -> list[tuple[int, int]]:
        if fused == "self_attn.qkv_proj":
            q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
        inter = self.config.intermediate_size
        return [(0, inter), (inter, 2 * inter)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into this model (casting to each parameter's dtype).

        Accepts the names of ``transformers``' ``*ForCausalLM`` checkpoints
        (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``, ...,
        ``model.norm.weight``, ``lm_head.weight``). q/k/v and gate/up go into their fused
        parameters. ``lm_head.weight`` is ignored when the embeddings are tied, as are rotary
        ``inv_freq`` buffers of old checkpoints. Raises ``ValueError`` for unknown names, shape
        mismatches and parameters left unset.
        """
        for module in self.modules():
            if isinstance(module, Linear):
                module.restore_plain_weight()  # a dropped (meta) weight would ignore the copy
        params = dict(self.named_parameters())
        expected: dict[str, int] = {}  # our param name -> number of shards still to come
        for name in params:
            module = name.rsplit(".", 1)[0]
            expected[name] = 3 if module.endswith("qkv_proj") else 2 if module.endswith("gate_up_proj") else 1
        if self.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        loaded: dict[str, int] = {}

        with torch.no_grad():
            for hf_name, tensor in weights:
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                if hf_name == "lm_head.weight" and self.tie_word_embeddings:
                    continue
                target, rows = self._map_name(hf_name)
                param = params.get(target)
                if param is None:
                    raise ValueError(f"unexpected weight {hf_name!r} (no parameter {target!r} in {self.model_type} model)")
                dest = param if rows is None else param[rows[0] : rows[1]]
                if tuple(dest.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"shape mismatch for {hf_name!r}: checkpoint {tuple(tensor.shape)}, model {tuple(dest.shape)}"
                    )
                dest.copy_(tensor)
                loaded[target] = loaded.get(target, 0) + 1

        missing = sorted(n for n, count in expected.items() if loaded.get(n, 0) < count)
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint lacks weights for: {shown}")

    def _map_name(self, hf_name: str) -> tuple[str, tuple[int, int] | None]:
        """HF checkpoint name -> (our parameter name, row range within a fused parameter or None)."""
        if hf_name == "model.embed_tokens.weight":
            return "embed_tokens.weight", None
        if hf_name == "model.norm.weight":
            return "norm.weight", None
        if hf_name == "lm_head.weight":
            return "lm_head.weight", None
        m = self._LAYER_RE.match(hf_name)
        if m is None:
            return hf_name, None
        idx, rest = m.group(1), m.group(2)
        module, _, leaf = rest.rpartition(".")
        if module in self._FUSED:
            fused, shard = self._FUSED[module]
            return f"layers.{idx}.{fused}.{leaf}", self._shard_ranges(fused)[shard]
        return f"layers.{idx}.{rest}", None
