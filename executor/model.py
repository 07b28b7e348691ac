"""Our own forward pass for Llama-family decoder-only models, on a paged KV cache.

The causal LM (:class:`LlamaForCausalLM`): embedding, decoder layers (:mod:`executor.layers`),
final norm and LM head, and the mapping of Hugging Face checkpoint names onto its fused weights.
Which configs it runs: :mod:`executor.model_config` (``llama``, ``mistral``, ``qwen2``).

Token layout is vLLM's flattened batch: no padding and no batch dimension. The new tokens of all
scheduled sequences lie back to back in one ``[num_tokens]`` vector; ``positions`` gives each
token's absolute position in its own sequence, and :class:`~executor.attention.AttentionMetadata`
says which tokens belong to which sequence and where their K/V go in the paged cache.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from executor import decoder_cpu
from executor.attention import AttentionMetadata
from executor.layers import DecoderLayer, KVPair, RMSNorm
from executor.linear import Linear
from executor.model_config import check_supported, config_value
from executor.rotary import RotaryEmbedding

logger = logging.getLogger("pagedserve.executor")


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
        self.num_kv_heads = config_value(config, "num_key_value_heads", self.num_heads)
        self.head_dim = config_value(config, "head_dim", self.hidden_size // self.num_heads)
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
        self.norm = RMSNorm(self.hidden_size, float(config_value(config, "rms_norm_eps", 1e-6)))
        self.lm_head = Linear(self.hidden_size, self.vocab_size, bias=False)
        self.tie_weights()

    def pack_weights(self, keep_plain: bool = True) -> int:
        """Pack every CPU linear weight now; returns how many.

        Which dtypes are packed, and for which kernel: :data:`executor.linear.PACKED_DTYPES` (fp32
        for :mod:`kernels.linear_cpu`; bf16 for :mod:`kernels.linear_bf16_cpu` on CPUs with AMX or
        AVX512-BF16, for oneDNN where that kernel is off); see :class:`Linear`.

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
            if isinstance(module, Linear) and module._repack() is not None:
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
        kv_caches: list[KVPair],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Run every layer over one step's new tokens.

        Args:
            input_ids: ``[num_tokens]`` int64, the new tokens of all sequences back to back.
            positions: ``[num_tokens]`` int64, each token's absolute position in its sequence.
            kv_caches: one ``(key_cache, value_cache)`` per layer in the model's dtype, shaped by
                :func:`executor.attention.kv_cache_shapes` (``[num_blocks, block_size, num_kv_heads,
                head_dim]``, or the compiled CPU kernel's blocked layout; allocate them with
                :func:`executor.attention.allocate_kv_cache`); this step's K/V are written at
                ``meta.slot_mapping``.
            meta: the step's batch layout (see :class:`~executor.attention.AttentionMetadata`).

        Returns:
            ``[num_tokens, hidden_size]`` final hidden states (after the last RMSNorm), model dtype.
        """
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} (key_cache, value_cache) pairs, got {len(kv_caches)}")
        compiled = decoder_cpu.for_step(self, kv_caches, self.embed_tokens.weight.dtype, meta.backend)
        if compiled is not None:  # the same kernel calls as the loop below, made from C
            hidden_states, residual = compiled.forward(self, input_ids, positions, kv_caches, meta)
            return self.norm.add_and_norm(hidden_states, residual)[0]
        hidden_states = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(positions, hidden_states.dtype)
        rope = (cos, RotaryEmbedding.signed_sin(sin))
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            # .forward: the per-layer modules skip nn.Module.__call__ (hooks are not supported
            # inside the model; a decode step makes ~300 such calls).
            hidden_states, residual = layer.forward(rope, hidden_states, residual, kv_cache, meta)
        return self.norm.add_and_norm(hidden_states, residual)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states [n, hidden_size]`` -> logits ``[n, vocab_size]`` in the model's dtype.

        Callers widen bf16 logits to fp32 (exact) where they need to: an all-greedy batch's argmax
        reads them as they are.
        """
        return self.lm_head(hidden_states)

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
