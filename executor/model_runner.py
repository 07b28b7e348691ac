"""The model runner: owns the model and its paged KV cache, and runs one step's forward pass.

In a step the engine calls it twice, after the block manager has answered:

1. :meth:`KVCache.apply_block_ops` carries out the copy-on-write copies and swaps the block manager
   ordered, so every block holds what the step's block tables say it holds;
2. :meth:`ModelRunner.execute` flattens the batch's new tokens, builds the attention metadata
   (positions, slot mapping, block table, sequence lengths), runs the forward pass, and returns the
   last hidden state of each sequence whose prompt is complete; on the way it extends the prompt
   log-probabilities of the requests that asked for them. The engine then asks for the logits
   (:meth:`ModelRunner.logits`) of the rows the sampler needs, and for the plain greedy rows only
   the argmax (:meth:`ModelRunner.greedy_tokens`), which an fp32 CPU model gets without most of
   the logits (:mod:`kernels.greedy_head_cpu`).

The runner never chooses a block: every block id it reads or writes comes from a block table the
block manager granted (the seat of vLLM v1's GPU model runner and of nano-vllm's ``ModelRunner``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

import kernels
from executor.attention import (
    AttentionMetadata,
    allocate_kv_cache,
    resolve_backend,
    runs_compiled_cpu_attention,
)
from executor.cost_probe import measure_cost_model
from executor.linear import Linear
from executor.request import Request
from executor.sampler import PROMPT_LOGPROB_ROWS, prompt_logprob_entries
from kernels import argmax_cpu, fused_cpu, greedy_head_cpu, linear_cpu
from kernels.argmax_cpu import argmax_rows

logger = logging.getLogger(__name__)

#: One scheduled sequence and how many of its tokens this step computes.
ScheduledSeq = tuple[Request, int]


@dataclass
class ModelInputs:
    """One step's flattened batch (vLLM's layout: no padding, no batch dimension).

    Attributes:
        input_ids, positions: ``[num_tokens]`` int64, the new tokens of all sequences back to back
            and each one's position in its own sequence.
        meta: the attention metadata (slot mapping, block table, sequence lengths, query starts).
        query_starts: ``meta.query_start_loc`` as a host list (``[num_seqs + 1]``), so reading
            it costs no device sync.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    query_starts: list[int]


@dataclass
class KVCache:
    """The executor's KV tensors: the device pool and the CPU swap pool.

    Attributes:
        device: where ``layers`` live.
        layers: one ``(key_cache, value_cache)`` per model layer, shaped by
            :func:`executor.attention.kv_cache_shapes` (``[num_blocks, ...]``; block ``b`` is
            ``key_cache[b]``, one contiguous slab, in every layout).
        cpu_layers: the CPU swap pool in the same layout (``[num_cpu_blocks, ...]``, pinned when
            ``device`` is CUDA); empty when swapping is off.
        backend: ``"triton"`` (copies and swaps by the Triton kernels) or ``"torch"`` (their twins).
    """

    device: torch.device
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    cpu_layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    backend: str = "torch"

    @classmethod
    def allocate(cls, model, num_blocks: int, block_size: int, num_cpu_blocks: int,
                 device: torch.device, dtype: torch.dtype, backend: str = "torch") -> KVCache:
        """Zeroed pools for ``model`` (its ``num_layers``, ``num_kv_heads`` and ``head_dim``), shaped
        for the kernels that read them (:func:`executor.attention.kv_cache_shapes`)."""
        layers = allocate_kv_cache(model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim,
                                   dtype=dtype, device=device, backend=backend)
        # The swap pool holds blocks in the device pool's layout, whatever its own device.
        pin = device.type == "cuda"
        cpu_layers = [tuple(torch.zeros((num_cpu_blocks, *t.shape[1:]), dtype=dtype, pin_memory=pin) for t in pair)
                      for pair in layers] if num_cpu_blocks else []
        return cls(device, layers, cpu_layers, backend)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block holds over all layers, keys and values (what a swap of it moves)."""
        key = self.layers[0][0]
        return 2 * len(self.layers) * key[0].numel() * key.element_size()

    def apply_block_ops(self, ops: list) -> None:
        """Carry out a step's swaps and copy-on-write copies, group by group in the given order.

        Args:
            ops: the block manager's ``reply["ops"]``: ``[kind, [[src, dst], ...]]`` groups with
                ``kind`` one of ``"copy"`` (device block to device block), ``"swap_out"`` (device
                to CPU) and ``"swap_in"`` (CPU to device). The order matters: a block copied on
                write may be swapped out later in the same step, and a block swapped out may then
                be a copy's target.
        """
        triton = self.backend == "triton"
        swap = kernels.swap_blocks if triton else kernels.swap_blocks_torch
        copy = kernels.copy_blocks if triton else kernels.copy_blocks_torch
        for kind, pairs in ops:
            if kind == "copy":
                mapping = torch.tensor(pairs, dtype=torch.int64, device=self.device)
                copy([k for k, _ in self.layers], [v for _, v in self.layers], mapping)
                continue
            mapping = torch.tensor(pairs, dtype=torch.int64)
            for dev_kv, cpu_kv in zip(self.layers, self.cpu_layers):
                src, dst = (dev_kv, cpu_kv) if kind == "swap_out" else (cpu_kv, dev_kv)
                for i in range(2):
                    swap(src[i], dst[i], mapping)


class ModelRunner:
    """Owns the model and the KV cache of one executor; runs the forward pass of each step.

    Args:
        model: an ``executor.model.LlamaForCausalLM`` (or anything with the same interface).
        num_blocks, block_size: the device pool (the block manager's numbering of it).
        num_cpu_blocks: the CPU swap pool; 0 disables swapping (and the cost probe).
        device, dtype: where and in what precision the KV cache lives.
        attention_backend: ``"auto"``, ``"triton"`` or ``"torch"``
            (:func:`executor.attention.resolve_backend`; raises its ``ValueError``).

    Attributes:
        backend: the resolved attention backend, ``"triton"`` or ``"torch"``.
        kv: the :class:`KVCache`.
        cost: what the block manager's swap-or-recompute decision needs
            (:func:`executor.cost_probe.measure_cost_model`), measured at start-up when swapping
            is on; else empty.
        greedy_head: the screened argmax of the LM head (:class:`kernels.greedy_head_cpu.GreedyHead`)
            where it runs: an fp32 model on a CPU with AVX512-BF16 or AMX whose LM head is on
            :mod:`kernels.linear_cpu`; else None (:meth:`greedy_tokens` takes the argmax of the logits).
    """

    def __init__(self, model, num_blocks: int, block_size: int, num_cpu_blocks: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 attention_backend: str = "auto"):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.backend = resolve_backend(attention_backend, self.device)
        if self.backend == "torch":  # built now, at start-up, rather than in the first request
            logger.info("CPU attention (%s cache): %s", str(dtype).removeprefix("torch."),
                        "one compiled call per layer (kernels/paged_attention_cpu.c), keys stored transposed "
                        "per block" if runs_compiled_cpu_attention(self.backend, self.device, dtype)
                        else "plain torch (kernels.torch_ref)")
        self.kv = KVCache.allocate(model, num_blocks, block_size, num_cpu_blocks, self.device, dtype, self.backend)
        self.cost = measure_cost_model(model, self.device, self.kv.bytes_per_block) if num_cpu_blocks else {}
        if self.device.type == "cpu":
            fused_cpu.backend()  # builds the layers' C library now, not in the first request
        argmax_cpu.backend()  # greedy sampling's too (it runs on the CPU for every device)
        self.greedy_head = self._build_greedy_head(dtype)
        if self.greedy_head is not None:
            logger.info("greedy sampling: the LM head's argmax screened in bf16, candidates confirmed in fp32 "
                        "(kernels/greedy_head_cpu.c; %s=torch turns it off)", greedy_head_cpu.ENV_VAR)

    def _build_greedy_head(self, dtype: torch.dtype) -> greedy_head_cpu.GreedyHead | None:
        lm_head = getattr(self.model, "lm_head", None)
        if not (self.device.type == "cpu" and dtype is torch.float32 and isinstance(lm_head, Linear)
                and lm_head.weight.dtype is torch.float32 and lm_head.bias is None and greedy_head_cpu.available()):
            return None
        pack = lm_head.packed()
        if type(pack) is not linear_cpu.PackedWeight:
            return None
        try:
            with torch.no_grad():
                return greedy_head_cpu.GreedyHead(lm_head.plain_weight().detach(), pack)
        except ValueError as exc:  # a NaN or inf in the weight: the argmax of the logits, as without it
            logger.warning("greedy sampling takes the argmax of the whole logits: %s", exc)
            return None

    def prepare_inputs(self, batch: list[ScheduledSeq]) -> ModelInputs:
        """The model's inputs for ``batch`` (see :class:`ModelInputs`).

        Sequence ``i`` contributes its ``n`` tokens from ``num_computed_tokens`` on; each token's
        slot is ``block_table[p // block_size] * block_size + p % block_size`` at its position
        ``p``. Block-table rows are padded with 0 to the longest.
        """
        bs = self.block_size
        input_ids, positions, slots, q_starts, seq_lens = [], [], [], [0], []
        for req, n in batch:
            start = req.num_computed_tokens
            input_ids.extend(req.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = req.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            q_starts.append(q_starts[-1] + n)
            seq_lens.append(start + n)
        max_blocks = max(len(req.block_table) for req, _ in batch)
        block_table = torch.zeros((len(batch), max_blocks), dtype=torch.int32)
        for i, (req, _) in enumerate(batch):
            block_table[i, : len(req.block_table)] = torch.tensor(req.block_table, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_table=block_table.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(q_starts, dtype=torch.int32, device=dev),
            max_query_len=max(n for _, n in batch),
            backend=self.backend,
        )
        return ModelInputs(torch.tensor(input_ids, dtype=torch.int64, device=dev),
                           torch.tensor(positions, dtype=torch.int64, device=dev), meta, q_starts)

    def execute(self, batch: list[ScheduledSeq]) -> tuple[list[int], torch.Tensor | None]:
        """Run the forward pass over ``batch``; the sequences' ``num_computed_tokens`` are left to the caller.

        Returns:
            ``(finishing, hidden)``: the indices into ``batch`` of the sequences whose whole prompt
            is in the cache after this step (only they get a next token), and their last positions'
            final hidden states ``[len(finishing), hidden_size]`` (on the model's device, in its
            dtype; None when there are none), for :meth:`logits` and :meth:`greedy_tokens`.
        """
        inputs = self.prepare_inputs(batch)
        q_starts = inputs.query_starts
        finishing = [i for i, (req, n) in enumerate(batch) if req.num_computed_tokens + n == req.num_tokens]
        last = None
        with torch.inference_mode():
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv.layers, inputs.meta)
            if finishing:
                last = hidden[torch.tensor([q_starts[i + 1] - 1 for i in finishing], device=self.device)]
            self._collect_prompt_logprobs(batch, hidden, q_starts)
        return finishing, last

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[n, vocab_size]`` of rows of :meth:`execute`'s ``hidden``, on the CPU in the
        model's dtype (the sampler and beam search widen them to fp32, exactly, where they need to)."""
        with torch.inference_mode():
            return self.model.compute_logits(hidden).cpu()

    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        """Each row's first largest logit, ``argmax_rows(self.logits(hidden))``: the same ints, from the
        screened head (:attr:`greedy_head`) where it runs."""
        head = self.greedy_head
        if head is not None and head.pack is not self.model.lm_head.packed():
            head = self.greedy_head = self._build_greedy_head(torch.float32)  # the LM head's weight changed
        if head is None:
            return argmax_rows(self.logits(hidden))
        with torch.inference_mode():
            return head.tokens(hidden)

    def _collect_prompt_logprobs(self, batch: list[ScheduledSeq], hidden: torch.Tensor,
                                 q_starts: list[int]) -> None:
        """Extend ``req.prompt_logprobs`` for the prompt positions this step computed.

        Position ``p`` (a row of ``hidden``) predicts prompt token ``p + 1``; logits come from the
        model's raw log-softmax, :data:`~executor.sampler.PROMPT_LOGPROB_ROWS` rows at a time. A
        chunked prefill adds its entries chunk by chunk; positions computed again (after a
        preemption by recompute) are skipped; positions this engine never computed (a
        prefix-cache hit, which ``needs_prompt_logprobs`` is meant to prevent) get None entries.
        """
        for i, (req, n) in enumerate(batch):
            if not req.needs_prompt_logprobs or req.prompt_logprobs_sent or req.parent_id is not None:
                continue  # n > 1 children and beams share the parent's prompt
            prompt = req.prompt_token_ids
            start = req.num_computed_tokens
            if req.prompt_logprobs is None:
                req.prompt_logprobs = [None]
            entries = req.prompt_logprobs
            while len(entries) < min(start + 1, len(prompt)):
                entries.append(None)  # skipped positions (never expected; keeps the alignment)
            lo, hi = len(entries) - 1, min(start + n, len(prompt) - 1)
            for a in range(lo, hi, PROMPT_LOGPROB_ROWS):
                b = min(hi, a + PROMPT_LOGPROB_ROWS)
                rows = hidden[q_starts[i] + a - start : q_starts[i] + b - start]
                logprobs = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1).cpu()
                entries.extend(prompt_logprob_entries(logprobs, prompt[a + 1 : b + 1], req.params.prompt_logprobs))
