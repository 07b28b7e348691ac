"""The executor's engine: one scheduler step = one block-manager round trip + one forward pass.

Per step:
1. the scheduler picks the batch (running decodes and prefill chunks, then admissions);
2. one batched request to the block manager frees finished sequences and grows the tables of the
   batch's sequences;
3. sequences the block manager denied drop out of the step (new ones wait, running ones are
   preempted by recompute, ones larger than the whole pool fail);
4. the model runner (:mod:`executor.model_runner`) carries out the step's copy/swap operations
   and runs the model on the flattened batch, reading and writing exactly the granted blocks;
5. sequences whose prompt is complete sample one token and are checked for EOS / max_tokens
   (plain greedy ones from the runner's argmax alone, :meth:`ModelRunner.greedy_tokens`);
   n > 1 completions and beams fork and drop sequences (:mod:`executor.sequence_group`).

Pipelined (async) scheduling, on unless ``--no-async-scheduling``: in steady decoding (every
running request a plain decode, none swapped out) step 2 for the next step is sent before this
step's forward pass and its reply read after it, so the block manager's round trip overlaps the
pass (:meth:`Engine._send_ahead`; vLLM v1's async scheduling is the same idea). The token the pass
is about to sample goes to the block manager as pending and its id with the following request.
"""

from __future__ import annotations

import logging
import time
import uuid

import torch

from blockmgr.protocol import PENDING
from executor.beam_search import BeamSearchGroup
from executor.block_manager_link import BlockManagerLink
from executor.config import ExecutorSettings as EngineConfig  # the engine reads the pool geometry from it
from executor.config import token_budget
from executor.model_runner import ModelRunner
from executor.outputs import RequestOutput, StepRecord, output_of
from executor.request import Request, SamplingParams, Status, build_request
from executor.sampler import SamplerOutput, sample_with_logprobs, takes_raw_argmax
from executor.scheduler import Scheduler
from executor.sequence_group import SequenceGroups

log = logging.getLogger("pagedserve.executor")


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

    Attributes:
        runner: the :class:`~executor.model_runner.ModelRunner` (model, KV tensors, forward pass).
        scheduler: the :class:`~executor.scheduler.Scheduler` (who runs in each step).
        groups: the :class:`~executor.sequence_group.SequenceGroups` (n > 1 completions, beams).
        link: the :class:`~executor.block_manager_link.BlockManagerLink` (registration, steps).

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
        self.max_model_len = config.max_model_len or model.max_model_len
        self.scheduler = Scheduler(config.max_num_seqs, token_budget(config.max_num_batched_tokens, device, dtype))
        self.requests: dict[str, Request] = {}
        self.pending_free: list[str] = []
        # Grow entries that only give a freed sequence's pending id (sent with its free).
        self.pending_settle: list[tuple[str, int, list[int]]] = []
        self.step_records: list[StepRecord] = []
        self.record_steps = False
        self.num_preemptions = 0
        self._num_steps = 0
        self.runner = ModelRunner(model, config.num_blocks, config.block_size, config.num_cpu_blocks, device, dtype,
                                  attention_backend=config.attention_backend)
        self.pending_fork: list[tuple[str, str]] = []
        self._ahead: list[tuple[Request, int]] | None = None  # the batch of the step sent ahead
        self.groups = SequenceGroups()
        self.link = BlockManagerLink(block_manager, executor_id, self.incarnation, config.num_blocks,
                                     config.block_size, config.num_cpu_blocks, self.runner.cost)
        self.link.register()

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
            ValueError: a duplicate id, or what :func:`executor.request.build_request` refuses
                (empty prompt, token ids outside the vocabulary, prompt + max_tokens beyond
                ``max_model_len``, a resumed request that is done already or has ``n > 1`` / beam
                search).
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        req = build_request(request_id, prompt_token_ids, params, self.model.vocab_size, self.max_model_len,
                            cache_salt=cache_salt, priority=priority, output_token_ids=output_token_ids)
        self.requests[request_id] = req
        if params.use_beam_search:
            max_len = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
            self.groups.start_beam_search(req, max_len, self.eos_token_ids)
        self.scheduler.add(req)

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """Drop a request with all its n > 1 completions or beams (or, with ``index``, only that
        completion, e.g. one the gateway ended on a stop string); their blocks are all freed at the
        next step. Returns False if unknown."""
        if index is not None:
            group = self.groups.completions(request_id) or [self.requests.get(request_id)]
            req = group[index] if 0 <= index < len(group) else None
            if req is None or req.status is Status.FINISHED or req.request_id not in self.requests:
                return False
            self._finish(req, "abort")
            return True
        group = [r for r in self.groups.remove(request_id) if r.request_id in self.requests]
        req = self.requests.get(request_id)
        if req is None and not group:
            return False
        for r in ([req] if req is not None else []) + [c for c in group if c is not req]:
            self.requests.pop(r.request_id, None)
            self.scheduler.remove(r)
            r.status = Status.FINISHED
            r.finish_reason = "abort"
            self._free_later(r)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.pending_free or self.pending_fork) or self._ahead is not None

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of every request that made progress."""
        t0 = time.perf_counter()
        outputs: list[RequestOutput] = []
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            # Sent during the last forward pass; whoever finished or was aborted since drops out
            # (its blocks are freed with the next step), and what the reply says of it is not
            # about a new request that took its id meanwhile (a resume sent to this executor).
            live = [(req, n) for req, n in ahead if self.requests.get(req.request_id) is req
                    and req.status is Status.RUNNING]
            reply = self.link.finish()
            if reply is not None and len(live) < len(ahead):
                gone = {req.request_id for req, _ in ahead} - {req.request_id for req, _ in live}
                reply = {**reply, "updates": {k: v for k, v in reply["updates"].items() if k not in gone},
                         "preempted": {k: v for k, v in reply["preempted"].items() if k not in gone}}
            batch = self._granted(reply, live, [], outputs)
            if batch is not None and self.scheduler.waiting and not self.scheduler.swapped:
                # Requests that arrived meanwhile join this step, as they would without the
                # pipelining: their admission goes in a second request, answered before the pass
                # (unless the reply swapped someone out: swap-ins go first, in the next step).
                granted = {req.request_id for req, _ in batch}
                extra = [(req, n) for req, n in self.scheduler.schedule() if req.request_id not in granted]
                lists = self._request_lists(extra, [])
                if lists is not None:
                    more = self._granted(self.link.step(**lists), extra, [], outputs)
                    batch = None if more is None else batch + more
        else:
            swap_ins = self.scheduler.schedule_swap_ins()
            batch = self.scheduler.schedule()
            lists = self._request_lists(batch, swap_ins)
            if lists is None:
                return []
            batch = self._granted(self.link.step(**lists), batch, swap_ins, outputs)
        if not batch:
            return outputs
        self._send_ahead(batch)
        outputs.extend(self._run(batch))
        self._num_steps += 1
        if self.record_steps:
            self.step_records.append(
                StepRecord(self._num_steps, {r.request_id: n for r, n in batch}, time.perf_counter() - t0)
            )
        return outputs

    def _granted(self, reply: dict | None, batch: list[tuple[Request, int]], swap_ins: list[Request],
                 outputs: list[RequestOutput]) -> list[tuple[Request, int]] | None:
        """Apply the block manager's ``reply`` and carry out its block copies; returns the part of
        ``batch`` that may run, or None when the block manager had lost this executor (every
        sequence then starts over by recompute)."""
        if reply is None:
            self._start_over(swap_ins)
            return None
        batch = self._apply_reply(reply, batch, swap_ins, outputs)
        self.runner.kv.apply_block_ops(reply["ops"])
        return batch

    def _request_lists(self, batch: list[tuple[Request, int]], swap_ins: list[Request]) -> dict | None:
        """The block-manager request for ``batch`` (and the pending forks and frees), or None if empty."""
        grow, admit = [], []
        for req, n in batch:
            start = req.num_computed_tokens
            if start == 0 and not req.block_table:
                admit.append((req.request_id, req.all_token_ids, n, self._salt(req), req.priority))
            else:
                # From the first id the block manager lacks: one it was sent as pending, if any.
                first = start if req.unreported_from is None else req.unreported_from
                grow.append((req.request_id, start + n, req.all_token_ids[first : start + n]))
                req.unreported_from = None
        fork, self.pending_fork = self.pending_fork, []
        free, self.pending_free = self.pending_free, []
        grow += self._take_settles()
        if not (grow or admit or fork or free or swap_ins):
            return None
        return {"fork": fork, "free": free, "grow": grow, "swap_in": [r.request_id for r in swap_ins], "admit": admit}

    def _send_ahead(self, batch: list[tuple[Request, int]]) -> None:
        """Pipelined (async) scheduling: send the next step's block-manager request before this
        step's forward pass, so that its round trip overlaps the pass (vLLM v1's async scheduling).

        Only in the steady state where the next step is predictable: the batch is every running
        request, each a plain single-sequence decode (no n > 1 completions, beams or forks), and
        nothing is swapped out (swap-ins are scheduled by steps sent the usual way). The next step
        then decodes the same requests, each one token further, but for those this step ends by
        length; the token this step samples goes as :data:`blockmgr.protocol.PENDING` and its id
        with the request after. A request that ends on EOS or is aborted meanwhile has room for a
        token it never computes, freed with the step after; requests waiting for admission are
        admitted by a second request in the next step (:meth:`step`).
        """
        sched = self.scheduler
        if (not self.config.async_scheduling or sched.swapped or self.pending_fork
                or len(batch) != len(sched.running)):
            return
        grow, ahead = [], []
        for req, n in batch:
            if (n != 1 or req.num_uncomputed_tokens != 1 or req.params.n != 1 or req.params.use_beam_search
                    or req.parent_id is not None):
                return
            if req.ends_by_length_after(1, self.max_model_len):
                continue
            pos = req.num_computed_tokens  # this step computes position pos and samples pos + 1
            first = pos + 1 if req.unreported_from is None else req.unreported_from
            grow.append((req, (req.request_id, pos + 2, req.all_token_ids[first : pos + 1] + [PENDING])))
        if not grow:
            return
        for req, _ in grow:
            req.unreported_from = req.num_computed_tokens + 1
            ahead.append((req, 1))
        free, self.pending_free = self.pending_free, []
        self.link.send(fork=[], free=free, grow=[entry for _, entry in grow] + self._take_settles(), swap_in=[],
                       admit=[])
        self._ahead = ahead

    def _take_settles(self) -> list[tuple[str, int, list[int]]]:
        settles, self.pending_settle = self.pending_settle, []
        return settles

    def _start_over(self, swap_ins: list[Request]) -> None:
        """Preempt every sequence by recompute: the block manager lost all of this executor's blocks."""
        self.pending_settle = []
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
            if seq_id in self.requests:  # else it finished while the step was in flight
                self.requests[seq_id].block_table[start:] = blocks
        for req in swap_ins:
            if req.request_id in reply["swapped_in"]:
                self.scheduler.swap_in_done(req)
            elif reply["denied"].get(req.request_id) == "never_fits":
                self._fail_never_fits(req, outputs)
            else:
                self.scheduler.swap_in_denied(req)
        for seq_id, kind in reply["preempted"].items():
            req = self.requests.get(seq_id)
            if req is None:  # it finished while the step was in flight; its free follows
                continue
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

    def _run(self, batch: list[tuple[Request, int]]) -> list[RequestOutput]:
        """Run the model on the batch, then sample (or score beams) where a prompt is complete."""
        finishing, hidden = self.runner.execute(batch)
        for req, n in batch:
            req.num_computed_tokens += n
        if not finishing:
            return []
        reqs = [batch[i][0] for i in finishing]
        beam_rows = [k for k, r in enumerate(reqs) if self.groups.is_beam(r.request_id)]
        sample_rows = [k for k, r in enumerate(reqs) if not self.groups.is_beam(r.request_id)]
        # Without the screened head, every row's logits come from one product (as before it existed:
        # a product whose rows depend on the batch then gives the same bits as ever).
        logits = self.runner.logits(hidden) if self.runner.greedy_head is None else None
        outputs = []
        if sample_rows:
            whole = len(sample_rows) == len(reqs)
            outputs += self._sample_and_append([reqs[k] for k in sample_rows],
                                               hidden if whole else hidden[sample_rows],
                                               logits if whole or logits is None else logits[sample_rows])
        if beam_rows:
            rows = logits[beam_rows] if logits is not None else self.runner.logits(hidden[beam_rows])
            for group in self.groups.offer([reqs[k] for k in beam_rows], rows):
                outputs += self._beam_step(group)
        return outputs

    def _sample_and_append(self, reqs: list[Request], hidden: torch.Tensor,
                           logits: torch.Tensor | None) -> list[RequestOutput]:
        """Sample one token per request (rows of ``hidden``, and of ``logits`` unless None: computed
        here as needed), fork n > 1 completions, check stops."""
        new_children = self.groups.make_children(reqs)
        if new_children:
            # Each child samples its first token from its parent's last-prompt logits.
            row_of = {r.request_id: k for k, r in enumerate(reqs)}
            parents = [row_of[c.parent_id] for c in new_children]
            hidden = torch.cat([hidden, hidden[parents]])
            logits = None if logits is None else torch.cat([logits, logits[parents]])
        picked = self._pick(reqs + new_children, hidden, logits)
        tokens, entries = picked.token_ids, picked.logprobs
        outputs = [self._append_token(req, token, entry) for req, token, entry in zip(reqs, tokens, entries)]
        for child, token, entry in zip(new_children, tokens[len(reqs):], entries[len(reqs):]):
            parent = self.groups.parent(child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.block_table = list(parent.block_table)
            outputs.append(self._append_token(child, token, entry))
            if child.status is not Status.FINISHED:
                # The block manager forks before it frees, so this holds even if the parent
                # finished in this very step.
                self._run_fork(child.parent_id, child)
        return outputs

    def _pick(self, reqs: list[Request], hidden: torch.Tensor, logits: torch.Tensor | None) -> SamplerOutput:
        """The sampler's answer for each request (row of ``hidden``): from ``logits`` when given; else
        the plain greedy rows from the runner's screened argmax alone, the rest sampled from their logits."""
        if logits is not None:
            return sample_with_logprobs(logits, reqs, self.eos_token_ids)
        plain = [i for i, r in enumerate(reqs) if takes_raw_argmax(r)]
        if not plain:
            return sample_with_logprobs(self.runner.logits(hidden), reqs, self.eos_token_ids)
        if len(plain) == len(reqs):
            return SamplerOutput(self.runner.greedy_tokens(hidden), [None] * len(reqs))
        plain_set = set(plain)
        rest = [i for i in range(len(reqs)) if i not in plain_set]
        sampled = sample_with_logprobs(self.runner.logits(hidden[rest]), [reqs[i] for i in rest], self.eos_token_ids)
        tokens, entries = [0] * len(reqs), [None] * len(reqs)
        for i, t in zip(plain, self.runner.greedy_tokens(hidden[plain])):
            tokens[i] = t
        for k, i in enumerate(rest):
            tokens[i], entries[i] = sampled.token_ids[k], sampled.logprobs[k]
        return SamplerOutput(tokens, entries)

    def _run_fork(self, source_id: str, child: Request) -> None:
        """Run ``child`` from now on, sharing ``source_id``'s blocks through a fork at the next step."""
        self.pending_fork.append((source_id, child.request_id))
        self.requests[child.request_id] = child
        child.status = Status.RUNNING
        self.scheduler.running.append(child)

    def _beam_step(self, group: BeamSearchGroup) -> list[RequestOutput]:
        """Advance a beam search whose beams all reported; fork, free and extend beams."""
        step = self.groups.advance(group)
        for beam in step.dropped:
            self.requests.pop(beam.request_id, None)
            self.scheduler.remove(beam)
            self._free_later(beam)
        if step.done:
            best = group.best()
            reason = "stop" if best and best[-1] in self.eos_token_ids else "length"
            cached = step.dropped[0].num_cached_tokens if step.dropped else 0
            return [RequestOutput(group.request_id, best, True, reason, None, group.prompt_len, cached, 0)]
        for src, child in step.forks:
            self._run_fork(src.request_id, child)
        return []

    def _append_token(self, req: Request, token: int, logprob_entry: dict | None = None) -> RequestOutput:
        req.output_token_ids.append(token)
        reason = req.stop_reason(token, self.eos_token_ids, self.max_model_len)
        if reason:
            self._finish(req, reason)
        return self._output(req, [token], None if logprob_entry is None else [logprob_entry])

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        self.scheduler.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        self.requests.pop(req.request_id, None)
        self._free_later(req)

    def _free_later(self, req: Request) -> None:
        """Free ``req``'s blocks with the next step; one whose last computed id the block manager
        has only as pending gets it first (so that the block holding it is published to the
        prefix cache: a continued conversation hits its whole history)."""
        self.pending_free.append(req.request_id)
        first = req.unreported_from
        if first is not None and first < req.num_computed_tokens:
            self.pending_settle.append((req.request_id, first + 1, req.all_token_ids[first : first + 1]))
        req.unreported_from = None

    def _output(self, req: Request, tokens: list[int], logprobs: list[dict] | None = None) -> RequestOutput:
        if req.status is Status.FINISHED:
            self.groups.completion_finished(req.parent_id or req.request_id)
        return output_of(req, tokens, logprobs)

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
