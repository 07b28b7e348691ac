"""One request on one executor: routing, admission, and its outputs as final text deltas per choice.

A :class:`Run` sends one ``generate`` message (all ``n`` children) to the executor the router picks
and turns the executor's token outputs into :class:`Delta` objects: text that can no longer
change (no half UTF-8 character, nothing that could still become a stop string) together with
the logprob entries of the tokens it came from. Non-streamed replies join the same deltas the
streamed ones send, so both always agree.

Failures: each run has a deadline (the request's ``request_timeout``, at most the server's
``request_timeout_s``, after its arrival); past it the run is
aborted on its executor (freeing its blocks) and ends with a 504 ``deadline_exceeded`` error. When
its executor dies (or the request cannot be delivered), an ``n == 1`` run resumes on another
healthy executor, or on the same one once it is back, waiting up to its deadline: it is sent
again with the tokens it already produced (``output_token_ids``), recomputed there, and continues
exactly (greedy and seeded sampling included: the executor advances the seeded generator past
those tokens' draws). A run with ``n > 1`` resumes each unfinished choice as a lone request (its
prompt plus that choice's tokens so far, seeded with the choice's derived seed,
:func:`executor.request.seed_for_child`), since a fork's child computes exactly what such a lone
request computes; later losses resume only the choice whose executor went. A beam search (whose
beams come only at its end) and an echo-only run restart from the beginning on another executor:
they are deterministic, so the result is the same. With no executor before the deadline, the run
ends with a 503 ``executor_unavailable``.

:meth:`Run.prime` waits for the first output before the HTTP response starts, so a request the
executor refuses is answered with a proper status instead of an error event in a 200 stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from executor.client import ExecutorUnavailable
from executor.request import seed_for_child
from gateway.choice_legs import ChoiceLegs
from gateway.detokenizer import TextStream
from gateway.errors import APIError, bad_request, unavailable
from gateway.logprobs import normalize_entry
from gateway.runtime import Gateway
from gateway.sampling import check_fits, resolve_max_tokens

log = logging.getLogger("pagedserve.gateway")


@dataclass
class Job:
    """What to run: one prompt, its executor params, and how to turn its tokens into text.

    Attributes:
        choice_offset: index of this prompt's first choice in the response (prompt i of a
            completions batch owns choices ``i*n .. i*n+n-1``).
        drop_output: echo with ``max_tokens`` 0: the executor runs one token only to compute
            the prompt logprobs; that token is not reported.
    """

    prompt_token_ids: list[int]
    params: dict[str, Any]
    n: int
    stop: list[str] = field(default_factory=list)
    priority: int = 0
    cache_salt: str | None = None
    skip_special_tokens: bool = True
    drop_output: bool = False
    choice_offset: int = 0
    width: int = 1  # sequences that grow at once (n, or the beam width)
    min_tokens: int = 0
    timeout_s: float | None = None  # the request's own deadline (capped by the server's)


@dataclass
class Delta:
    """New final text of one choice, the tokens (and their logprob entries) it came from, and the
    finish reason when this is the choice's last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict]
    finish_reason: str | None = None


@dataclass
class _Choice:
    stream: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    produced: list[int] = field(default_factory=list)  # every token so far (to resume elsewhere)
    num_tokens: int = 0
    done: bool = False
    last_output: float | None = None


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _raise_for(msg: dict) -> None:
    reason = msg.get("error") or "the executor refused the request"
    if msg.get("unavailable"):
        raise unavailable(reason, "executor_unavailable")
    raise bad_request(reason)


class Run:
    """One executor request (one prompt, all its choices). Create with :func:`start_run`."""

    def __init__(self, gw: Gateway, job: Job, request_id: str, handle, cached_hint: int, arrival: float):
        self.gw, self.job, self.request_id, self.handle = gw, job, request_id, handle
        self.arrival = arrival
        self.num_prompt_tokens = len(job.prompt_token_ids)
        self.num_cached_tokens = 0
        self.cached_hint = cached_hint
        self.prompt_logprobs: list | None = None
        self.first_token_at: float | None = None
        self.choices = [_Choice(TextStream(gw.tokenizer, job.stop, job.skip_special_tokens)) for _ in range(job.n)]
        self.timeout_s = min(job.timeout_s or gw.settings.request_timeout_s, gw.settings.request_timeout_s)
        self.deadline = arrival + self.timeout_s
        self.num_resumes = 0
        self._gen = handle.client.generate(request_id, job.prompt_token_ids, job.params, job.priority, job.cache_salt)
        self._first: dict | None = None
        self._waiting = True
        self._closed = False
        handle.waiting += job.width  # the waiting queue counts sequences
        gw.inflight[request_id] = handle.executor_id

    # -- lifecycle ------------------------------------------------------------------------------
    def _not_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            self.handle.waiting -= self.job.width

    async def _next(self) -> dict | None:
        """The next output; resumes elsewhere when the executor is lost; None at the end.

        Raises:
            APIError: 504 past the deadline; 503 when the executor is lost and the run cannot
                resume or no executor takes it over before the deadline.
        """
        while True:
            remaining = self.deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                # In this task (not wait_for's, which in 3.11 can swallow a cancellation).
                async with asyncio.timeout(remaining):
                    msg = await self._gen.__anext__()
            except StopAsyncIteration:
                return None
            except asyncio.TimeoutError:
                await self._gen.aclose()  # aborts it on the executor, which frees its blocks
                raise APIError(504, f"the request did not finish within its deadline of {self.timeout_s:g}s",
                               "timeout_error", None,
                               "deadline_exceeded") from None
            except ExecutorUnavailable as exc:  # the generate message could not be delivered
                msg = {"finish_reason": "error", "unavailable": True, "error": str(exc)}
            if msg.get("finish_reason") == "error" and msg.get("unavailable"):
                await self._resume(str(msg.get("error")), int(msg.get("index", 0) or 0))
                continue
            return msg

    async def _pick(self, tokens: list[int], reason: str):
        """A healthy executor for ``tokens`` (prompt + output so far), waiting for one up to the deadline.

        Raises:
            APIError(503): none became healthy before the deadline.
        """
        while True:
            if time.monotonic() >= self.deadline:
                raise unavailable(f"{reason}; no executor took the request over before its deadline",
                                  "executor_unavailable")
            try:
                handle, _ = await self.gw.router.pick(tokens, self.job.cache_salt)
                return handle
            except APIError:  # none healthy yet: wait for one (or for the same one to come back)
                await asyncio.sleep(min(0.2, max(0.0, self.deadline - time.monotonic())))

    def _resume_params(self) -> dict[str, Any]:
        params = dict(self.job.params)
        if self.prompt_logprobs is not None:
            params["prompt_logprobs"] = None  # already received
        return params

    async def _resume(self, reason: str, index: int = 0) -> None:
        """Send the run (or, once split into lone choices, choice ``index``) again, with what it
        produced so far, to an executor that answers.

        Raises:
            APIError(503): no executor before the deadline, or a beam search / echo run that had
                already produced output (cannot happen: they report only at their end).
        """
        self._not_waiting()
        self.num_resumes += 1
        if isinstance(self._gen, ChoiceLegs):
            await self._resume_choice(index, reason)
            return
        if self.job.n > 1:
            await self._gen.aclose()
            self._gen = ChoiceLegs()
            for i, c in enumerate(self.choices):
                if not c.done:
                    await self._resume_choice(i, reason)
            return
        restart = bool(self.job.params.get("use_beam_search")) or self.job.drop_output
        produced = [] if restart else list(self.choices[0].produced)
        if restart and self.choices[0].produced:
            raise unavailable(f"{reason}; the request had reported output and cannot restart",
                              "executor_unavailable")
        log.warning("request %s lost executor %s (%s) after %d tokens; %s it", self.request_id,
                    self.handle.executor_id, reason, len(produced), "restarting" if restart else "resuming")
        # The lost stream ended with its error output; closing it unregisters the request id at the
        # old executor's client, so the id may be sent again (also to that executor, once back) and
        # a dead executor does not count it as in flight while we wait for one.
        await self._gen.aclose()
        handle = await self._pick(self.job.prompt_token_ids + produced, reason)
        self.handle = handle
        self.gw.inflight[self.request_id] = handle.executor_id
        self._gen = handle.client.generate(self.request_id, self.job.prompt_token_ids, self._resume_params(),
                                           self.job.priority, self.job.cache_salt,
                                           **({"output_token_ids": produced} if produced else {}))
        log.info("request %s resumes on executor %s after %d tokens", self.request_id, handle.executor_id,
                 len(produced))

    async def _resume_choice(self, index: int, reason: str) -> None:
        """Choice ``index`` of an n > 1 run as a lone request: the choice's derived seed, its tokens so far."""
        legs: ChoiceLegs = self._gen
        legs.drop(index)
        produced = list(self.choices[index].produced)
        log.warning("request %s choice %d lost its executor (%s) after %d tokens; resuming it alone",
                    self.request_id, index, reason, len(produced))
        handle = await self._pick(self.job.prompt_token_ids + produced, reason)
        params = self._resume_params()
        params["n"] = 1
        if params.get("seed") is not None:
            params["seed"] = seed_for_child(params["seed"], index)
        leg_id = f"{self.request_id}/{index}.{self.num_resumes}"  # never reused, whatever came before
        self.handle = handle
        self.gw.inflight[self.request_id] = handle.executor_id
        legs.add(index, handle, leg_id,
                 handle.client.generate(leg_id, self.job.prompt_token_ids, params, self.job.priority,
                                        self.job.cache_salt, **({"output_token_ids": produced} if produced else {})))

    def abort_now(self) -> None:
        """Abort the run on its executor(s) without waiting (fire and forget)."""
        if isinstance(self._gen, ChoiceLegs):
            self._gen.abort_all()
        else:
            self.handle.client.abort(self.request_id)

    def _abort_choice(self, index: int) -> None:
        if isinstance(self._gen, ChoiceLegs):
            self._gen.drop(index)
        else:
            self.handle.client.abort(self.request_id, index)

    async def prime(self) -> None:
        """Wait for the first output; raise APIError if the executor refused the request."""
        msg = await self._next()
        self._not_waiting()
        if msg is None:
            raise unavailable("the executor ended the request without output", "executor_unavailable")
        if msg.get("finish_reason") == "error":
            await self.aclose()
            _raise_for(msg)
        self._account(msg, time.monotonic())
        self._first = msg

    async def aclose(self) -> None:
        """Stop the request (aborts it on the executor if it is still running)."""
        if self._closed:
            return
        self._closed = True
        self._not_waiting()
        self.gw.inflight.pop(self.request_id, None)
        await self._gen.aclose()

    # -- outputs --------------------------------------------------------------------------------
    def _account(self, msg: dict, now: float) -> None:
        if "num_prompt_tokens" in msg and msg["num_prompt_tokens"]:
            self.num_prompt_tokens = int(msg["num_prompt_tokens"])
        if msg.get("num_cached_tokens") is not None and self.first_token_at is None:
            self.num_cached_tokens = int(msg["num_cached_tokens"])
        if msg.get("prompt_logprobs") is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = list(msg["prompt_logprobs"])
        m = self.gw.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            m.ttft.observe(now - self.arrival)
            m.prompt_tokens.inc(self.num_prompt_tokens)

    def _consume(self, msg: dict, now: float) -> Delta | None:
        idx = int(msg.get("index", 0) or 0)
        if not 0 <= idx < len(self.choices):
            log.warning("request %s: output for unknown index %s ignored", self.request_id, idx)
            return None
        c = self.choices[idx]
        if c.done:
            return None
        ids = [] if self.job.drop_output else list(msg.get("token_ids") or [])
        entries = [] if self.job.drop_output else [normalize_entry(e) for e in (msg.get("logprobs") or [])]
        if ids:
            self.gw.metrics.generation_tokens.inc(len(ids))
            if c.last_output is not None:
                self.gw.metrics.itl.observe((now - c.last_output) / len(ids))
            c.last_output = now
        c.token_ids += ids
        c.produced += ids
        c.logprobs += [e for e in entries if e is not None]
        c.num_tokens += len(ids)
        text = c.stream.push(ids)
        finish = None
        if c.stream.stopped:
            finish = "stop"
            if not msg.get("finished") and any(not o.done for o in self.choices if o is not c):
                # Answered on a stop string while its siblings go on: stop its decoding now.
                self._abort_choice(idx)
        elif msg.get("finished"):
            text += c.stream.finish()
            finish = "length" if self.job.drop_output else _finish_reason(msg.get("finish_reason"))
        if not text and finish is None:
            return None
        delta = Delta(self.job.choice_offset + idx, text, c.token_ids, c.logprobs, finish)
        c.token_ids, c.logprobs = [], []
        if finish is not None:
            c.done = True
        return delta

    async def deltas(self) -> AsyncIterator[Delta]:
        """Final text deltas of every choice until all have finished; closes the run at the end.

        Raises:
            APIError: the executor failed the request mid-way (400), or went away (503).
        """
        try:
            msg, self._first = self._first, None
            while True:
                if msg is None:
                    msg = await self._next()
                    if msg is None:
                        break
                if msg.get("finish_reason") == "error":
                    _raise_for(msg)
                now = time.monotonic()
                self._account(msg, now)
                delta = self._consume(msg, now)
                msg = None
                if delta is not None:
                    yield delta
                if all(c.done for c in self.choices):
                    break
            self.gw.metrics.e2e.observe(time.monotonic() - self.arrival)
        finally:
            await self.aclose()

    @property
    def num_completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)


async def start_run(gw: Gateway, job: Job, request_id: str, arrival: float) -> Run:
    """Route ``job``, check it fits the chosen executor, submit it and wait for its first output.

    Raises:
        APIError(503): no executor; APIError(400): it can never fit or the executor refused it.
    """
    handle, cached = await gw.router.pick(job.prompt_token_ids, job.cache_salt)
    num_prompt = len(job.prompt_token_ids)
    max_tokens = resolve_max_tokens(job.params, handle.info, num_prompt, gw.settings.max_model_len, job.width,
                                    job.min_tokens)
    check_fits(handle.info, num_prompt, max_tokens, gw.settings.max_model_len, job.width)
    run = Run(gw, job, request_id, handle, cached, arrival)
    try:
        await run.prime()
    except BaseException:
        await run.aclose()
        raise
    return run


async def start_runs(gw: Gateway, jobs: list[Job], prefix: str, arrival: float) -> tuple[str, list[Run]]:
    """Start every job (prompts of one completions request) at once; all or none.

    Returns:
        (the response id, the runs in job order). Executor request ids are ``<id>`` for a single
        job and ``<id>-<i>`` for job i of several.

    Raises:
        APIError(429): the waiting queue cannot take all the request's sequences (checked for
            the request as a whole, so a batch cannot slip past it).
    """
    gw.check_capacity(sum(job.width for job in jobs))
    response_id = f"{prefix}-{uuid.uuid4().hex}"
    ids = [response_id] if len(jobs) == 1 else [f"{response_id}-{i}" for i in range(len(jobs))]
    tasks = [asyncio.ensure_future(start_run(gw, job, rid, arrival)) for job, rid in zip(jobs, ids)]
    try:
        await asyncio.wait(tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await _close_started(tasks)
        raise
    failed = next((t for t in tasks if t.exception() is not None), None)
    if failed is not None:
        await _close_started(tasks)
        raise failed.exception()
    return response_id, [t.result() for t in tasks]


async def _close_started(tasks) -> None:
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is None:
            await t.result().aclose()
        elif not t.done():
            try:
                await t
            except BaseException:
                pass


async def merged_deltas(runs: list[Run]) -> AsyncIterator[Delta]:
    """The deltas of several runs as they come. Closing the iterator closes (aborts) every run."""
    if len(runs) == 1:
        gen = runs[0].deltas()
        try:
            async for d in gen:
                yield d
        finally:
            await gen.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(run: Run):
        try:
            async for d in run.deltas():
                queue.put_nowait(d)
        except BaseException as exc:  # handed to the consumer
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(done)

    tasks = [asyncio.ensure_future(pump(r)) for r in runs]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                if isinstance(item, asyncio.CancelledError):
                    continue
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for r in runs:
            if not r._closed:
                r.abort_now()


async def close_runs(runs: list[Run]) -> None:
    """Close (abort, if unfinished) every run; closing a closed run does nothing."""
    for r in runs:
        try:
            await r.aclose()
        except Exception:  # a generator still running in another task: abort it directly
            r.abort_now()


def usage(runs: list[Run]) -> dict:
    """The ``usage`` object of a response over all its runs (prompts)."""
    prompt = sum(r.num_prompt_tokens for r in runs)
    completion = sum(r.num_completion_tokens for r in runs)
    cached = sum(r.num_cached_tokens for r in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
