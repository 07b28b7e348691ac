"""The CPU forward pass's decoder layers in one C call (:mod:`kernels.decoder_cpu`), when they can be.

:class:`CompiledLayers` takes a :class:`~executor.model.LlamaForCausalLM` and, for a step whose every
kernel call the Python loop of :mod:`executor.layers` would make on the compiled CPU kernels, runs
the same calls from C: the bits of the Python loop, without its per-call overhead (about 10 us of
interpreter and ctypes per call, ~270 calls per step; measured gains in docs/cpu-step-profile.md).

When it runs (else the model runs its Python loop, unchanged):

- CPU tensors, fp32 or bf16; the compiled attention (:func:`executor.attention.runs_compiled_cpu_attention`)
  and fused operators (:mod:`kernels.fused_cpu`) in use, and the driver built
  (``PAGEDSERVE_DECODER_CPU`` not ``torch``);
- every linear layer of every layer packed for our own kernel with its plain weight dropped (as
  :func:`executor.model_loader.load_model` leaves them: the packs then cannot change under it):
  fp32 on :mod:`kernels.linear_cpu`, or bf16 on :mod:`kernels.linear_bf16_cpu`;
- no autograd.
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING

import torch

from executor.attention import AttentionMetadata, runs_compiled_cpu_attention
from executor.linear import Linear
from kernels import decoder_cpu, fused_cpu, linear_bf16_cpu, linear_cpu, paged_attention_cpu
from kernels.paged_attention_cpu import StepLayout

if TYPE_CHECKING:
    from executor.layers import KVPair
    from executor.model import LlamaForCausalLM

logger = logging.getLogger("pagedserve.executor")
_PACKS = {torch.float32: linear_cpu.PackedWeight, torch.bfloat16: linear_bf16_cpu.PackedWeight}


class CompiledLayers:
    """The decoder layers of ``model`` through :mod:`kernels.decoder_cpu` (see the module doc).

    Built once per model, dtype and list of KV caches (:func:`for_step` rebuilds it when any linear
    layer is packed, dropped or restored again, which bumps :attr:`executor.linear.Linear.generation`);
    holds the per-layer argument structs, so a step only sets its buffers and sizes. The norm weights
    are read through their storage: copying into them (``load_weights``, ``load_state_dict``) is seen,
    replacing a norm's Parameter object is not.
    """

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[KVPair], dtype: torch.dtype, backend: str):
        self.dtype, self.kv_caches, self.generation, self.backend = dtype, kv_caches, Linear.generation, backend
        self.usable = self._usable(model, kv_caches, dtype, backend)
        if not self.usable:
            return
        lib = decoder_cpu.library()
        fused = fused_cpu.library()
        suffix = "" if dtype is torch.float32 else "_bf16"
        if dtype is torch.float32:
            linear = linear_cpu.library().linear_cpu
        else:
            linear = linear_bf16_cpu.library().linear_bf16
        self._lib = lib
        layers = (decoder_cpu.Layer * model.num_layers)()
        keep = []  # every tensor whose memory the structs point at
        for layer, spec, (key_cache, value_cache) in zip(model.layers, layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            for name, lin in (("qkv", attn.qkv_proj), ("o", attn.o_proj), ("gate_up", mlp.gate_up_proj),
                              ("down", mlp.down_proj)):
                pack = lin._pack
                args = getattr(spec, name)
                args.k, args.n, args.w = pack.in_features, pack.out_features, pack.panels.data_ptr()
                args.bias = lin.bias.data_ptr() if lin.bias is not None else None
                keep += [pack.panels, lin.bias]
            norm1, norm2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            spec.norm1, spec.norm2 = norm1.data_ptr(), norm2.data_ptr()
            spec.key_cache, spec.value_cache = key_cache.data_ptr(), value_cache.data_ptr()
            keep += [norm1, norm2, key_cache, value_cache]
        self._layers, self._keep = layers, keep
        first = model.layers[0]
        a = self.args = decoder_cpu.DecoderArgs()
        a.num_layers, a.layers = model.num_layers, layers
        a.hidden, a.heads, a.kv_heads = model.hidden_size, model.num_heads, model.num_kv_heads
        a.head_dim, a.inter = model.head_dim, first.mlp.intermediate_size
        a.eps = first.input_layernorm.eps
        a.linear = decoder_cpu.function_pointer(linear)
        a.norm = decoder_cpu.function_pointer(getattr(fused, "add_rms_norm" + suffix))
        a.rope = decoder_cpu.function_pointer(getattr(fused, "rope_rotate" + suffix))
        a.silu = decoder_cpu.function_pointer(getattr(fused, "silu_and_mul" + suffix))
        a.attention = decoder_cpu.function_pointer(paged_attention_cpu.library().paged_attention_cpu)
        a.key_cache_offset, a.value_cache_offset = paged_attention_cpu.cache_pointer_offsets()
        self._cache_shape = kv_caches[0][0].shape
        self.scale = first.self_attn.scale

    @staticmethod
    def _usable(model: LlamaForCausalLM, kv_caches: list[KVPair], dtype: torch.dtype, backend: str) -> bool:
        reason = CompiledLayers._why_not(model, kv_caches, dtype, backend)
        if kv_caches and kv_caches[0][0].is_cpu:  # a GPU executor has no use for this line
            if reason is None:
                logger.info("CPU forward pass: %s decoder layers in one C call per step (kernels/decoder_cpu.c)", dtype)
            else:
                logger.info("CPU forward pass: %s decoder layers through the Python loop (%s)", dtype, reason)
        return reason is None

    @staticmethod
    def _why_not(model: LlamaForCausalLM, kv_caches: list[KVPair], dtype: torch.dtype, backend: str) -> str | None:
        """None when the driver can run these layers (the module doc's conditions), else why not."""
        if dtype not in _PACKS or len(kv_caches) != model.num_layers:
            return f"{dtype} has no compiled linear kernel" if dtype not in _PACKS else "one cache pair per layer needed"
        key_cache = kv_caches[0][0]
        if not (key_cache.is_cpu and key_cache.dtype is dtype
                and runs_compiled_cpu_attention(backend, key_cache.device, dtype)):
            return "the compiled CPU attention does not run here"
        # The caches must be laid out as the compiled attention reads them.
        num_blocks, _, _, block_size = key_cache.shape
        shapes = paged_attention_cpu.cache_shapes(num_blocks, block_size, model.num_kv_heads, model.head_dim)
        for k, v in kv_caches:
            if ((tuple(k.shape), tuple(v.shape)) != shapes or k.dtype is not dtype or v.dtype is not dtype
                    or not (k.is_contiguous() and v.is_contiguous())):
                return "the KV caches are not in the compiled attention's layout"
        for module, variable in ((fused_cpu, "PAGEDSERVE_FUSED_CPU"), (decoder_cpu, decoder_cpu.ENV_VAR)):
            if module.backend() != "compiled":
                return f"{module.__name__} is off: {variable}=torch, or its C build failed (logged above)"
        if model.embed_tokens.weight.dtype is not dtype:
            return "the embedding is in another dtype"
        eps = {layer.input_layernorm.eps for layer in model.layers} | {
            layer.post_attention_layernorm.eps for layer in model.layers}
        if len(eps) != 1:
            return "the norms' eps differ"
        pack_type = _PACKS[dtype]
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                if not lin.weight.is_meta:
                    return "a linear layer keeps its plain weight (packs could go stale)"
                if type(lin._pack) is not pack_type:
                    return "a linear layer is not packed for our kernel"
                if lin.bias is not None and (lin.bias.dtype is not dtype or not lin.bias.is_contiguous()):
                    return "a bias in another dtype or layout"
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if norm.weight.dtype is not dtype or not norm.weight.is_contiguous():
                    return "a norm weight in another dtype or layout"
        return None

    def forward(self, model: LlamaForCausalLM, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVPair], meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer over one step's tokens; returns ``(mlp output, residual)``, each ``[T, hidden]``,
        whose sum's RMSNorm is the model's output (as the Python loop's last layer returns them).

        Raises:
            ValueError: a bad entry in the step's layout (as :func:`kernels.paged_attention_cpu.paged_attention_cpu`).
            MemoryError: a linear kernel could not allocate its scratch copy of ``x``.
        """
        dtype, a = self.dtype, self.args
        T = input_ids.shape[0]
        hidden = model.hidden_size
        e = model.embed_tokens(input_ids)
        cos, sin = model.rotary_emb.cos_sin(positions, dtype)
        ssin = type(model.rotary_emb).signed_sin(sin)
        if cos.stride(-1) != 1 or ssin.stride(0) != cos.stride(0) or cos.numel() != T * a.head_dim:
            cos, ssin = cos.contiguous(), ssin.contiguous()
        qkv_width = (a.heads + 2 * a.kv_heads) * a.head_dim
        n, o, d = (torch.empty((T, hidden), dtype=dtype) for _ in range(3))
        qkv = torch.empty((T, qkv_width), dtype=dtype)
        att = torch.empty((T, a.heads * a.head_dim), dtype=dtype)
        gu = torch.empty((T, 2 * a.inter), dtype=dtype)
        act = torch.empty((T, a.inter), dtype=dtype)
        plan = meta.torch_plan
        if not isinstance(plan, StepLayout):
            plan = meta.torch_plan = StepLayout(meta.slot_mapping, meta.block_table, meta.query_start_loc,
                                                meta.seq_lens)
        if plan.num_tokens != T:
            raise ValueError(f"slot_mapping has {plan.num_tokens} entries for {T} tokens")
        pa = plan.args
        num_blocks, _, _, block_size = self._cache_shape
        pa.num_heads, pa.num_kv_heads, pa.head_dim = a.heads, a.kv_heads, a.head_dim
        pa.num_blocks, pa.block_size = num_blocks, block_size
        pa.q_token, pa.q_head = qkv_width, a.head_dim
        pa.k_token, pa.k_head, pa.v_token, pa.v_head = qkv_width, a.head_dim, qkv_width, a.head_dim
        threads = torch.get_num_threads()
        pa.threads, pa.scale, pa.bf16 = threads, self.scale, dtype is torch.bfloat16
        elem = qkv.element_size()
        base = qkv.data_ptr()
        pa.query, pa.key = base, base + a.heads * a.head_dim * elem
        pa.value, pa.out = base + (a.heads + a.kv_heads) * a.head_dim * elem, att.data_ptr()
        a.tokens, a.threads = T, threads
        a.attention_args = ctypes.addressof(pa)
        a.e, a.n, a.qkv, a.a, a.o, a.gu, a.act, a.d = (t.data_ptr() for t in (e, n, qkv, att, o, gu, act, d))
        a.cos_, a.ssin, a.cs_stride = cos.data_ptr(), ssin.data_ptr(), cos.stride(0)
        err = self._lib.decoder_forward(ctypes.byref(a))
        if err:
            if err >= 1000:
                raise MemoryError(f"layer {a.failed_layer}: a linear kernel could not allocate its copy of x")
            raise paged_attention_cpu.error(err, pa.error_index)
        return d, e


def for_step(model: LlamaForCausalLM, kv_caches: list[KVPair], dtype: torch.dtype,
             backend: str) -> CompiledLayers | None:
    """The model's :class:`CompiledLayers` for this step (built or rebuilt as needed), or None when
    the step runs the Python loop (the module doc's conditions). Cheap when nothing changed: a few
    attribute reads."""
    if torch.is_grad_enabled():
        return None
    runner = model.__dict__.get("_compiled_layers")
    if (runner is None or runner.dtype is not dtype or runner.kv_caches is not kv_caches
            or runner.generation != Linear.generation or runner.backend != backend):
        runner = model.__dict__["_compiled_layers"] = CompiledLayers(model, kv_caches, dtype, backend)
    return runner if runner.usable else None
