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

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

import kernels
from blockmgr.client import BlockManagerUnavailable, UnknownExecutor
from executor.attention import AttentionMetadata
from executor.beam_search import BeamSearchGroup
from executor.config import ExecutorSettings as EngineConfig  # the engine reads the pool geometry from it
from executor.cost_probe import measure_cost_model
from executor.request import Request, SamplingParams, Status, seed_for_child
from executor.sampler import PROMPT_LOGPROB_ROWS, prompt_logprob_entries, sample_with_logprobs
from executor.scheduler import Scheduler

log = logging.getLogger("pagedserve.executor")


@dataclass
class RequestOutput:
    """What one step produced for one request (sent to the gateway).

    Attributes:
        logprobs: when the request set ``logprobs``, one entry per ``new_token_ids`` item:
            ``{"token_id", "logprob", "top": [[token_id, logprob], ...]}`` (see
            :mod:`executor.sampler`); else None.
        prompt_logprobs: on a request's first output only, when it set ``prompt_logprobs``: one
            item per prompt token, ``None`` for the first, then entries of the same shape.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    index: int = 0  # which of the request's n completions
    logprobs: list[dict] | None = None
    prompt_logprobs: list | None = None


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
        incarnation: this process's id at the block manager (default: a fresh UUID). A new
            incarnation makes the block manager drop what an earlier process of the same
            ``executor_id`` held (its KV cache died with it) and refuse that process from then on.

    Raises (from :meth:`step`):
        blockmgr.client.StaleIncarnation: a newer process registered under ``executor_id``.
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
        incarnation: str | None = None,
    ):
        self.model = model
        self.incarnation = incarnation or uuid.uuid4().hex
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
        cpu_shape = (config.num_cpu_blocks, *shape[1:])
        pin = self.device.type == "cuda"
        self.cpu_caches = [
            (torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin), torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin))
            for _ in range(model.num_layers)
        ] if config.num_cpu_blocks else []
        self.pending_fork: list[tuple[str, str]] = []
        self.children: dict[str, list[Request]] = {}  # request id -> its n > 1 completions
        self.beam_of: dict[str, BeamSearchGroup] = {}  # beam sequence id -> its search
        self._step_id = 0
        self.block_manager_patience_s = 120.0
        bytes_per_block = 2 * model.num_layers * shape[1] * shape[2] * shape[3] * self.kv_caches[0][0].element_size()
        self.cost = measure_cost_model(model, self.device, bytes_per_block) if config.num_cpu_blocks else {}
        self._register()

    def _register(self) -> dict:
        c = self.config
        return self.bm.register(self.executor_id, c.num_blocks, c.block_size, c.num_cpu_blocks, self.cost,
                                incarnation=self.incarnation)

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    cache_salt: str | None = None, priority: int = 0,
                    output_token_ids: list[int] | None = None) -> None:
        """Queue a request; it joins the batch at the next step.

        Args:
            cache_salt: requests share prefix-cache blocks only with requests of the same salt.
            priority: lower is served first (ties: first come, first served); preemption picks
                the highest value first.
            output_token_ids: tokens the request already generated on an executor that died: it
                resumes by recompute (its prompt and these are prefilled) and continues exactly
                as it would have there: penalties, ``min_tokens`` and ``max_tokens`` count them,
                and a seeded generator is advanced past their draws. Only for ``n == 1`` without
                beam search.

        Raises:
            ValueError: duplicate id, empty prompt, token ids outside the vocabulary,
                prompt + max_tokens beyond ``max_model_len``, or a resumed request that is done
                already or has ``n > 1`` / beam search.
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.vocab_size
        if any(not (0 <= t < vocab) for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        params.validate()
        if any(t >= vocab for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 to generate, got {params.max_tokens}")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the model's context length {self.max_model_len}"
            )
        req = Request(request_id, list(prompt_token_ids), params, cache_salt=cache_salt, priority=priority)
        if output_token_ids:
            if params.n != 1 or params.use_beam_search:
                raise ValueError("only n=1 requests without beam search can resume from output_token_ids")
            if any(not (0 <= t < vocab) for t in output_token_ids):
                raise ValueError(f"output token ids must be in [0, {vocab})")
            if len(output_token_ids) >= params.max_tokens:
                raise ValueError(f"the request already has {len(output_token_ids)} of its {params.max_tokens} tokens")
            req.output_token_ids = list(output_token_ids)
            req.owed_draws = len(output_token_ids) if params.temperature != 0 else 0
        self.requests[request_id] = req
        if params.use_beam_search:
            self.beam_of[request_id] = BeamSearchGroup(
                request_id, params.beam_width, len(prompt_token_ids), min(total, self.max_model_len),
                self.eos_token_ids, beams=[req], scores=[0.0])
        self.scheduler.add(req)

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """Drop a request with all its n > 1 completions or beams (or, with ``index``, only that
        completion, e.g. one the gateway ended on a stop string); their blocks are all freed at the
        next step. Returns False if unknown."""
        if index is not None:
            group = self.children.get(request_id) or [self.requests.get(request_id)]
            req = group[index] if 0 <= index < len(group) else None
            if req is None or req.status is Status.FINISHED or req.request_id not in self.requests:
                return False
            self._finish(req, "abort")
            return True
        group = [r for r in self.children.pop(request_id, []) if r.request_id in self.requests]
        beams = self._beam_group(request_id)
        if beams is not None:
            group += beams.beams
            for b in beams.beams:
                self.beam_of.pop(b.request_id, None)
        req = self.requests.get(request_id)
        if req is None and not group:
            return False
        for r in ([req] if req is not None else []) + [c for c in group if c is not req]:
            self.requests.pop(r.request_id, None)
            self.scheduler.remove(r)
            r.status = Status.FINISHED
            r.finish_reason = "abort"
            self.pending_free.append(r.request_id)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.pending_free or self.pending_fork)

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of every request that made progress."""
        t0 = time.perf_counter()
        swap_ins = self.scheduler.schedule_swap_ins()
        batch = self.scheduler.schedule()
        grow, admit = [], []
        for req, n in batch:
            start = req.num_computed_tokens
            if start == 0 and not req.block_table:
                admit.append((req.request_id, req.all_token_ids, n, self._salt(req), req.priority))
            else:
                grow.append((req.request_id, start + n, req.all_token_ids[start : start + n]))
        fork, self.pending_fork = self.pending_fork, []
        free, self.pending_free = self.pending_free, []
        if not (grow or admit or fork or free or swap_ins):
            return []
        self._step_id += 1
        reply = self._bm_step(fork=fork, free=free, grow=grow, swap_in=[r.request_id for r in swap_ins], admit=admit)
        if reply is None:
            self._start_over(swap_ins)
            return []
        outputs: list[RequestOutput] = []
        batch = self._apply_reply(reply, batch, swap_ins, outputs)
        self._apply_block_ops(reply)
        if batch:
            outputs.extend(self._run(batch))
        self._num_steps += 1
        if self.record_steps:
            self.step_records.append(
                StepRecord(self._num_steps, {r.request_id: n for r, n in batch}, time.perf_counter() - t0)
            )
        return outputs

    def _bm_step(self, **lists) -> dict:
        """Send this step to the block manager, retrying while it is unreachable.

        The step id makes a retry safe: a block manager that applied the step but lost the reply
        (it restarted from Redis) answers the same step id with the same reply. A block manager
        that lost this executor (it restarted without Redis) gets it registered again; then
        nothing of this step was applied and None is returned.
        """
        deadline = time.monotonic() + self.block_manager_patience_s
        while True:
            try:
                return self.bm.step(self.executor_id, step_id=self._step_id, incarnation=self.incarnation, **lists)
            except BlockManagerUnavailable as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s; retrying step %d", exc, self._step_id)
                time.sleep(0.2)
            except UnknownExecutor as exc:
                log.warning("%s; registering again: every sequence restarts by recompute", exc)
                self._register()
                return None

    def _start_over(self, swap_ins: list[Request]) -> None:
        """Preempt every sequence by recompute: the block manager lost all of this executor's blocks."""
        sched = self.scheduler
        for req in swap_ins + list(sched.swapped):
            if req in sched.swapped:
                sched.swapped.remove(req)
            sched.running.append(req)
        for req in list(sched.running):
            sched.preempt(req)
            self.num_preemptions += 1

    @staticmethod
    def _salt(req: Request) -> str | None:
        if getattr(req, "needs_prompt_logprobs", False):
            # Prompt logprobs need every prompt position computed: a salt no one else has
            # guarantees a prefix-cache miss.
            return f"prompt-logprobs:{req.request_id}"
        return req.cache_salt

    def _apply_reply(self, reply: dict, batch, swap_ins: list[Request], outputs: list[RequestOutput]):
        """Apply the block manager's answer; returns the part of the batch that may run."""
        for seq_id, (start, blocks) in reply["updates"].items():
            self.requests[seq_id].block_table[start:] = blocks
        for req in swap_ins:
            if req.request_id in reply["swapped_in"]:
                self.scheduler.swap_in_done(req)
            elif reply["denied"].get(req.request_id) == "never_fits":
                self._fail_never_fits(req, outputs)
            else:
                self.scheduler.swap_in_denied(req)
        for seq_id, kind in reply["preempted"].items():
            req = self.requests[seq_id]
            log.info("preempting %s by %s", seq_id, kind)
            self.num_preemptions += 1
            if kind == "swap":
                self.scheduler.swap_out(req)
            else:
                self.scheduler.preempt(req)
        kept = []
        for req, n in batch:
            seq_id = req.request_id
            if seq_id in reply["preempted"]:
                continue
            reason = reply["denied"].get(seq_id)
            if reason == "never_fits":
                self._fail_never_fits(req, outputs)
            elif reason is not None:
                self.scheduler.unadmit(req)
            else:
                if seq_id in reply["admitted"]:
                    cached = reply["admitted"][seq_id]
                    req.num_computed_tokens = req.num_cached_tokens = cached
                    n = min(n, req.num_tokens - cached)
                kept.append((req, n))
        return kept

    def _fail_never_fits(self, req: Request, outputs: list[RequestOutput]) -> None:
        self._finish(req, "error", error=(
            f"the request needs more KV blocks than the executor's pool has "
            f"({self.config.num_blocks} blocks of {self.config.block_size} tokens)"
        ))
        outputs.append(self._output(req, []))

    def _apply_block_ops(self, reply: dict) -> None:
        """Carry out the step's swaps and copy-on-write copies before its forward pass, group by
        group in the block manager's order (``reply["ops"]``: a block copied on write may be
        swapped out later in the same step, a block swapped out may then be a copy's target)."""
        cuda = self.device.type == "cuda"
        swap = kernels.swap_blocks if cuda else kernels.swap_blocks_torch
        copy = kernels.copy_blocks if cuda else kernels.copy_blocks_torch
        for kind, pairs in reply["ops"]:
            if kind == "copy":
                mapping = torch.tensor(pairs, dtype=torch.int64, device=self.device)
                copy([k for k, _ in self.kv_caches], [v for _, v in self.kv_caches], mapping)
                continue
            mapping = torch.tensor(pairs, dtype=torch.int64)
            for dev_kv, cpu_kv in zip(self.kv_caches, self.cpu_caches):
                src, dst = (dev_kv, cpu_kv) if kind == "swap_out" else (cpu_kv, dev_kv)
                for i in range(2):
                    swap(src[i], dst[i], mapping)

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
            # Only sequences whose whole prompt is now in the cache get a next token.
            finishing = [i for i, (req, n) in enumerate(batch) if req.num_computed_tokens + n == req.num_tokens]
            if finishing:
                last_rows = torch.tensor([q_starts[i + 1] - 1 for i in finishing], device=dev)
                logits = self.model.compute_logits(hidden[last_rows]).float().cpu()
            self._collect_prompt_logprobs(batch, hidden, q_starts)
        for req, n in batch:
            req.num_computed_tokens += n
        if not finishing:
            return []
        reqs = [batch[i][0] for i in finishing]
        beam_rows = [k for k, r in enumerate(reqs) if r.request_id in self.beam_of]
        sample_rows = [k for k, r in enumerate(reqs) if r.request_id not in self.beam_of]
        outputs = []
        if sample_rows:
            rows = logits if len(sample_rows) == len(reqs) else logits[sample_rows]
            outputs += self._sample_and_append([reqs[k] for k in sample_rows], rows)
        ready: list[BeamSearchGroup] = []
        for k in beam_rows:
            group = self.beam_of[reqs[k].request_id]
            if group.offer(reqs[k], logits[k]) and group not in ready:
                ready.append(group)
        for group in ready:
            outputs += self._beam_step(group)
        return outputs

    def _sample_and_append(self, reqs: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample one token per request (rows of ``logits``), fork n > 1 completions, check stops."""
        new_children = self._make_children(reqs)
        if new_children:
            # Each child samples its first token from its parent's last-prompt logits.
            row_of = {r.request_id: k for k, r in enumerate(reqs)}
            logits = torch.cat([logits, logits[[row_of[c.parent_id] for c in new_children]]])
        picked = sample_with_logprobs(logits, reqs + new_children, self.eos_token_ids)
        tokens, entries = picked.token_ids, picked.logprobs
        outputs = [self._append_token(req, token, entry) for req, token, entry in zip(reqs, tokens, entries)]
        for child, token, entry in zip(new_children, tokens[len(reqs):], entries[len(reqs):]):
            parent = self.children[child.parent_id][0]
            child.num_computed_tokens = parent.num_computed_tokens
            child.block_table = list(parent.block_table)
            outputs.append(self._append_token(child, token, entry))
            if child.status is not Status.FINISHED:
                # The block manager forks before it frees, so this holds even if the parent
                # finished in this very step.
                self.pending_fork.append((child.parent_id, child.request_id))
                self.requests[child.request_id] = child
                child.status = Status.RUNNING
                self.scheduler.running.append(child)
        return outputs

    def _beam_group(self, request_id: str) -> BeamSearchGroup | None:
        return next((g for g in self.beam_of.values() if g.request_id == request_id), None)

    def _beam_step(self, group: BeamSearchGroup) -> list[RequestOutput]:
        """Advance a beam search whose beams all reported; fork, free and extend beams."""
        continuations, dropped, done = group.advance()
        for beam in dropped:
            self.beam_of.pop(beam.request_id, None)
            self.requests.pop(beam.request_id, None)
            self.scheduler.remove(beam)
            self.pending_free.append(beam.request_id)
        if done:
            best = group.best()
            reason = "stop" if best and best[-1] in self.eos_token_ids else "length"
            cached = dropped[0].num_cached_tokens if dropped else 0
            return [RequestOutput(group.request_id, best, True, reason, None, group.prompt_len, cached, 0)]
        taken: set[str] = set()
        new_beams = []
        for src, token in continuations:
            if src.request_id not in taken:
                taken.add(src.request_id)
                new_beams.append((src, token))
                continue
            # Another continuation of an already-continued beam: fork its pre-token state.
            child = Request(group.new_seq_id(), src.prompt_token_ids, src.params,
                            output_token_ids=list(src.output_token_ids),
                            num_computed_tokens=src.num_computed_tokens, block_table=list(src.block_table),
                            status=Status.RUNNING, cache_salt=src.cache_salt, priority=src.priority,
                            parent_id=group.request_id, num_cached_tokens=src.num_cached_tokens)
            self.pending_fork.append((src.request_id, child.request_id))
            self.requests[child.request_id] = child
            self.beam_of[child.request_id] = group
            self.scheduler.running.append(child)
            new_beams.append((child, token))
        for beam, token in new_beams:
            beam.output_token_ids.append(token)
        group.beams = [b for b, _ in new_beams]
        return []

    def _append_token(self, req: Request, token: int, logprob_entry: dict | None = None) -> RequestOutput:
        req.output_token_ids.append(token)
        reason = self._stop_reason(req, token)
        if reason:
            self._finish(req, reason)
        return self._output(req, [token], None if logprob_entry is None else [logprob_entry])

    def _collect_prompt_logprobs(self, batch: list[tuple[Request, int]], hidden: torch.Tensor,
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

    def _make_children(self, sampling: list[Request]) -> list[Request]:
        """Completions 1..n-1 of requests with n > 1 that sample their first token now.

        They share the prompt's K/V with the request (completion 0) through a block-manager fork;
        each gets its own derived seed (:func:`executor.request.seed_for_child`).
        """
        children = []
        for req in sampling:
            if req.params.n == 1 or req.parent_id is not None or req.request_id in self.children:
                continue
            group = [req]
            for i in range(1, req.params.n):
                params = dataclasses.replace(req.params, seed=seed_for_child(req.params.seed, i))
                child = Request(f"{req.request_id}#{i}", req.prompt_token_ids, params, cache_salt=req.cache_salt,
                                priority=req.priority, parent_id=req.request_id, index=i,
                                num_cached_tokens=req.num_cached_tokens)
                group.append(child)
                children.append(child)
            self.children[req.request_id] = group
        return children

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        # EOS and stop_token_ids end a request only past min_tokens (the sampler suppresses them
        # until then; this keeps a stop token that slipped through from ending it early).
        if len(req.output_token_ids) > p.min_tokens:
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

    def _output(self, req: Request, tokens: list[int], logprobs: list[dict] | None = None) -> RequestOutput:
        finished = req.status is Status.FINISHED
        rid = req.parent_id or req.request_id
        if finished and rid in self.children:
            if all(c.status is Status.FINISHED for c in self.children[rid]):
                del self.children[rid]
        return RequestOutput(
            rid,
            tokens,
            finished,
            req.finish_reason,
            req.error,
            len(req.prompt_token_ids),
            req.num_cached_tokens,
            req.index,
            logprobs,
            self._take_prompt_logprobs(req) if tokens else None,
        )

    @staticmethod
    def _take_prompt_logprobs(req: Request) -> list | None:
        """The prompt log-probabilities, for the request's first output only."""
        if req.prompt_logprobs is None or req.prompt_logprobs_sent:
            return None
        req.prompt_logprobs_sent = True
        return req.prompt_logprobs

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
