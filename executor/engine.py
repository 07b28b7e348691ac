"""The executor's engine: one scheduler step = one block-manager round trip + one forward pass.

Per step:
1. the scheduler picks the batch (running decodes and prefill chunks, then admissions);
2. one batched request to the block manager frees finished sequences and grows the tables of the
   batch's sequences;
3. sequences the block manager denied drop out of the step (new ones wait, running ones are
   preempted by recompute, ones larger than the whole pool fail);
4. the model runs on the flattened batch, reading and writing exactly the granted blocks;
5. sequences whose prompt is complete sample one token and are checked for EOS / max_tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from executor.attention import AttentionMetadata
from executor.request import Request, SamplingParams, Status
from executor.sampler import sample
from executor.scheduler import Scheduler

log = logging.getLogger("pagedserve.executor")


@dataclass
class EngineConfig:
    """Knobs of one executor.

    Attributes:
        block_size: tokens per KV block.
        num_blocks: device KV blocks in the pool.
        max_num_seqs: most sequences per step.
        max_num_batched_tokens: token budget per step (decodes + prefill chunks).
        max_model_len: longest sequence (prompt + output) accepted; defaults to the model's.
    """

    block_size: int = 16
    num_blocks: int = 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None


@dataclass
class RequestOutput:
    """What one step produced for one request (sent to the gateway)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0


@dataclass
class StepRecord:
    """What a step did, for tests and benchmarks: who ran and how many tokens each computed."""

    step: int
    scheduled: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0


class Engine:
    """Runs requests on a model with a paged KV cache whose blocks the block manager grants.

    Args:
        model: an ``executor.model.LlamaForCausalLM`` (or anything with the same interface).
        block_manager: a ``blockmgr.client`` client (service or in-process).
        config: :class:`EngineConfig`.
        eos_token_ids: tokens that end a request unless it sets ``ignore_eos``.
        executor_id: this executor's name at the block manager.
        device, dtype: where and in what precision the KV cache lives.
    """

    def __init__(
        self,
        model,
        block_manager,
        config: EngineConfig,
        eos_token_ids: set[int],
        executor_id: str = "executor-0",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.model = model
        self.bm = block_manager
        self.config = config
        self.eos_token_ids = set(eos_token_ids)
        self.executor_id = executor_id
        self.device = torch.device(device)
        self.max_model_len = config.max_model_len or model.max_model_len
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.pending_free: list[str] = []
        self.step_records: list[StepRecord] = []
        self.record_steps = False
        self.num_preemptions = 0
        self._num_steps = 0
        shape = (config.num_blocks, config.block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in range(model.num_layers)
        ]
        self.bm.register(executor_id, config.num_blocks, config.block_size)

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it joins the batch at the next step.

        Raises:
            ValueError: duplicate id, empty prompt, token ids outside the vocabulary, or
                prompt + max_tokens beyond ``max_model_len``.
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.vocab_size
        if any(not (0 <= t < vocab) for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        params.validate()
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 to generate, got {params.max_tokens}")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the model's context length {self.max_model_len}"
            )
        req = Request(request_id, list(prompt_token_ids), params)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        """Drop a request; its blocks are freed at the next step. Returns False if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = "abort"
        self.pending_free.append(request_id)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.pending_free)

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of every request that made progress."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        grow = [(req.request_id, req.num_computed_tokens + n) for req, n in batch]
        free, self.pending_free = self.pending_free, []
        if not grow and not free:
            return []
        reply = self.bm.step(self.executor_id, free, grow)
        for seq_id, (start, blocks) in reply["updates"].items():
            req = self.requests[seq_id]
            req.block_table[start:] = blocks
        outputs: list[RequestOutput] = []
        denied = reply["denied"]
        if denied:
            batch = self._handle_denied(batch, denied, outputs)
        if batch:
            outputs.extend(self._run(batch))
        self._num_steps += 1
        if self.record_steps:
            self.step_records.append(
                StepRecord(self._num_steps, {r.request_id: n for r, n in batch}, time.perf_counter() - t0)
            )
        return outputs

    def _handle_denied(self, batch, denied: dict[str, str], outputs: list[RequestOutput]):
        kept = []
        for req, n in batch:
            reason = denied.get(req.request_id)
            if reason is None:
                kept.append((req, n))
            elif reason == "never_fits":
                self._finish(req, "error", error=(
                    f"the request needs more KV blocks than the executor's pool has "
                    f"({self.config.num_blocks} blocks of {self.config.block_size} tokens)"
                ))
                outputs.append(self._output(req, []))
            elif req.num_computed_tokens == 0 and not req.block_table:
                self.scheduler.unadmit(req)
            else:
                log.info("preempting %s (recompute): no free KV blocks", req.request_id)
                self.scheduler.preempt(req)
                self.num_preemptions += 1
                self.pending_free.append(req.request_id)
        return kept

    def _run(self, batch: list[tuple[Request, int]]) -> list[RequestOutput]:
        bs = self.config.block_size
        input_ids, positions, slots, q_starts, seq_lens = [], [], [], [0], []
        for req, n in batch:
            start = req.num_computed_tokens
            tokens = req.all_token_ids[start : start + n]
            input_ids.extend(tokens)
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
        )
        with torch.inference_mode():
            hidden = self.model(
                torch.tensor(input_ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev),
                self.kv_caches,
                meta,
            )
            # Only sequences whose whole prompt is now in the cache sample a token.
            samplers = [i for i, (req, n) in enumerate(batch) if req.num_computed_tokens + n == req.num_tokens]
            if samplers:
                last_rows = torch.tensor([q_starts[i + 1] - 1 for i in samplers], device=dev)
                logits = self.model.compute_logits(hidden[last_rows]).float().cpu()
                tokens = sample(logits, [batch[i][0] for i in samplers])
        outputs = []
        sampled = dict(zip(samplers, tokens)) if samplers else {}
        for i, (req, n) in enumerate(batch):
            req.num_computed_tokens += n
            token = sampled.get(i)
            if token is None:
                continue
            req.output_token_ids.append(token)
            reason = self._stop_reason(req, token)
            if reason:
                self._finish(req, reason)
            outputs.append(self._output(req, [token]))
        return outputs

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        self.scheduler.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        self.requests.pop(req.request_id, None)
        self.pending_free.append(req.request_id)

    @staticmethod
    def _output(req: Request, tokens: list[int]) -> RequestOutput:
        return RequestOutput(
            req.request_id,
            tokens,
            req.status is Status.FINISHED,
            req.finish_reason,
            req.error,
            len(req.prompt_token_ids),
        )

    # -- offline use ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion together (continuous batching); returns each one's output ids."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{self._num_steps}-{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {i: [] for i in ids}
        for rid, prompt, p in zip(ids, prompts, params_list):
            if p.max_tokens == 0:
                continue
            self.add_request(rid, prompt, p)
        while self.has_work():
            for out in self.step():
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                results[out.request_id].extend(out.new_token_ids)
        return [results[i] for i in ids]
