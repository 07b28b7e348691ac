"""The building blocks of a Llama-family decoder layer, on a paged KV cache.

One decoder layer (pre-norm residual blocks)::

    h = x + o_proj(PagedAttention(RoPE(q_proj(n1)), RoPE(k_proj(n1)), v_proj(n1)))   n1 = RMSNorm(x)
    y = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))                            n2 = RMSNorm(h)

As in vLLM, each residual addition is carried into the next RMSNorm: a layer takes and returns the
pair (last block's output, residual stream so far), and :meth:`RMSNorm.add_and_norm` adds the two
and normalises in one call. With RoPE in place on the q/k/v projection's output and SiLU * up in
one call, these are the compiled CPU operators of :mod:`kernels.fused_cpu` for fp32 and bf16 on
the CPU (torch formulas elsewhere).

Token layout is vLLM's flattened batch: ``[num_tokens, ...]``, the new tokens of all scheduled
sequences back to back (see :class:`~executor.attention.AttentionMetadata`).

References:
    - RMSNorm: Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    - SwiGLU: Shazeer, "GLU Variants Improve Transformer", 2020 (arXiv:2002.05202).
    - Grouped-query attention: Ainslie et al., "GQA: Training Generalized Multi-Query Transformer
      Models from Multi-Head Checkpoints", EMNLP 2023.
    - PagedAttention: Kwon et al., SOSP 2023.
    - RoPE: :mod:`executor.rotary`.

Weights use vLLM's fused layout: ``qkv_proj`` is ``cat(q_proj, k_proj, v_proj)`` along the output
dimension and ``gate_up_proj`` is ``cat(gate_proj, up_proj)``: one matmul each instead of three and
two (:meth:`executor.model.LlamaForCausalLM.load_weights` maps checkpoint names onto them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from executor.attention import AttentionMetadata, paged_attention
from executor.linear import Linear
from executor.model_config import UnsupportedModelError, config_value
from kernels.fused_cpu import add_rms_norm, rope_rotate_, silu_and_mul

#: One layer's ``(key_cache, value_cache)``, shaped by :func:`executor.attention.kv_cache_shapes`.
KVPair = tuple[torch.Tensor, torch.Tensor]
#: ``(cos, signed_sin)``, each ``[num_tokens, 1, head_dim]``, from :meth:`RotaryEmbedding.cos_sin`
#: and :meth:`RotaryEmbedding.signed_sin`; computed once per step and shared by every layer.
Rope = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): ``w * x / sqrt(mean(x^2) + eps)``.

    The statistic is computed in fp32 and the normalised activations are cast back to the input
    dtype before the (learned, per-channel) scale, exactly as transformers' ``LlamaRMSNorm``.
    (``F.rms_norm`` straight on bf16/fp16 would apply the scale before that rounding: other bits.)

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
        # The fp32 statistic and normalisation in one call (the same bits as the five separate
        # operations: tests/executor/test_model.py), then the scale in the input dtype.
        normed = F.rms_norm(x.to(torch.float32), (x.shape[-1],), None, self.eps)
        return self.weight * normed.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(RMSNorm(x + residual), x + residual)``, or ``(RMSNorm(x), x)`` when ``residual`` is None.

        ``x`` and ``residual``: ``[T, hidden_size]``; both may be overwritten (the results reuse
        their memory on the CPU in fp32 and bf16). See :func:`kernels.fused_cpu.add_rms_norm`, whose
        CPU sum of squares runs in another order than :meth:`forward`'s (relative difference about
        1e-7; in bf16 at most one ulp after rounding), in the same order for every row.
        """
        return add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Attention(nn.Module):
    """Grouped-query self-attention (Ainslie et al. 2023) over the paged KV cache.

    ``num_heads`` query heads share ``num_kv_heads`` key/value heads (query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)``). Softmax scale ``head_dim ** -0.5``.
    """

    def __init__(self, config: Any, head_dim: int, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config_value(config, "num_key_value_heads", self.num_heads)
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

    def forward(self, rope: Rope, hidden_states: torch.Tensor, kv_cache: KVPair, meta: AttentionMetadata) -> Tensor:
        """``hidden_states [T, hidden]`` -> ``[T, hidden]``; writes this step's K/V into ``kv_cache``.

        ``rope`` is ``(cos, signed_sin)``, each ``[T, 1, head_dim]``, from
        :meth:`RotaryEmbedding.cos_sin` and :meth:`RotaryEmbedding.signed_sin`.
        """
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj.forward(hidden_states)
        # Query and key heads rotated together, in place: they lie side by side at each row's start.
        rope_rotate_(qkv, self.num_heads + self.num_kv_heads, self.head_dim, *rope)
        q, k, v = qkv.view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim).split(
            [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        key_cache, value_cache = kv_cache
        out = paged_attention(q, k, v, key_cache, value_cache, meta, self.scale)
        return self.o_proj.forward(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``; gate and up fused."""

    def __init__(self, config: Any, bias: bool) -> None:
        super().__init__()
        act = config_value(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only silu / SwiGLU)")
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate_size, bias=bias)
        self.down_proj = Linear(self.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward(silu_and_mul(self.gate_up_proj.forward(x)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``h = x + attn(norm1(x)); y = h + mlp(norm2(h))``.

    The residual additions are carried into the norms (see the module docstring): :meth:`forward`
    takes the previous layer's ``(mlp output, residual)`` and returns its own.
    """

    def __init__(self, config: Any, head_dim: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> None:
        super().__init__()
        eps = float(config_value(config, "rms_norm_eps", 1e-6))
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Attention(config, head_dim, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config, mlp_bias)

    def forward(self, rope: Rope, hidden_states: torch.Tensor, residual: torch.Tensor | None, kv_cache: KVPair,
                meta: AttentionMetadata) -> tuple[Tensor, Tensor]:
        """One layer over ``[T, hidden]`` tokens; returns ``(mlp output, residual)``, each ``[T, hidden]``.

        The layer's input is ``hidden_states + residual`` (``hidden_states`` alone for the first
        layer, ``residual=None``), its output the sum of the two it returns. Both arguments may be
        overwritten. Writes this step's K/V into ``kv_cache``.
        """
        hidden_states, residual = self.input_layernorm.add_and_norm(hidden_states, residual)
        hidden_states = self.self_attn.forward(rope, hidden_states, kv_cache, meta)
        hidden_states, residual = self.post_attention_layernorm.add_and_norm(hidden_states, residual)
        return self.mlp.forward(hidden_states), residual
