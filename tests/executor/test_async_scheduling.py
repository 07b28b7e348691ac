"""Pipelined (async) scheduling: in steady decoding the engine sends the next step's block-manager
request before the forward pass and reads the reply after it (``Engine._send_ahead``). The tokens
must be those of one-step-at-a-time scheduling, whatever ends, aborts, arrives or is preempted
while a request is in flight, and no block may leak."""

import pytest

from blockmgr.client import BlockManagerUnavailable, InProcessBlockManager, PendingStep
from blockmgr.manager import BlockManager
from executor.engine import Engine, EngineConfig
from executor.request import SamplingParams

BS = 4
TEXTS = ["The capital of France is", "def fib(n):", "Once upon a time, in a land far away, there lived", "1, 2, 3,"]
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(smollm):
    _, tok = smollm
    return [tok.encode(t) for t in TEXTS]


def used(bm) -> int:
    return bm.stats()["executor-0"]["device"]["used"]


def watch(engine) -> dict:
    """Count the steps sent ahead and the preemptions their replies carried."""
    seen = {"ahead": 0, "preempted_ahead": 0}
    send, finish = engine.link.send, engine.link.finish

    def counted_send(**lists):
        seen["ahead"] += 1
        send(**lists)

    def counted_finish():
        reply = finish()
        seen["preempted_ahead"] += len(reply["preempted"]) if reply else 0
        return reply

    engine.link.send, engine.link.finish = counted_send, counted_finish
    return seen


def run(engine, requests: dict) -> dict:
    got = {rid: [] for rid in requests}
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    while engine.has_work():
        for out in engine.step():
            assert out.error is None
            got[out.request_id] += out.new_token_ids
    return got


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_steady_decodes_are_sent_ahead_with_the_same_tokens(make_engine, prompts, params):
    results = {}
    for pipelined in (True, False):
        engine, bm = make_engine(block_size=BS, async_scheduling=pipelined)
        seen = watch(engine)
        results[pipelined] = run(engine, {f"r{i}": (ids, params) for i, ids in enumerate(prompts)})
        assert used(bm) == 0
        assert (seen["ahead"] >= 15) if pipelined else seen["ahead"] == 0, seen
    assert results[True] == results[False]
    assert all(len(out) == 20 for out in results[True].values())


def test_what_ends_or_is_aborted_while_in_flight_drops_out_and_frees_its_blocks(make_engine, prompts):
    engine, bm = make_engine(block_size=BS, async_scheduling=False)
    ref = run(engine, {"a": (prompts[0], GREEDY), "b": (prompts[1], GREEDY), "c": (prompts[2], GREEDY)})
    # "a" ends on a stop token the step after its request for the next step went out.
    k = next(i for i in range(3, 20) if ref["a"][i] not in ref["a"][:i])
    stop_a = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[ref["a"][k]])
    engine, bm = make_engine(block_size=BS)
    seen = watch(engine)
    for rid, ids, params in (("a", prompts[0], stop_a), ("b", prompts[1], GREEDY), ("c", prompts[2], GREEDY)):
        engine.add_request(rid, ids, params)
    got = {"a": [], "b": [], "c": []}
    while engine._ahead is None:
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert engine.abort("c")
    while engine.has_work():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert got["a"] == ref["a"][: k + 1] and got["b"] == ref["b"]
    assert seen["ahead"] > k and used(bm) == 0 and not engine.requests


def test_preemption_in_a_reply_read_after_the_pass(make_engine, prompts):
    """A pool too small for every output: steady decodes run out of blocks, and the block manager
    preempts in a reply to a step sent ahead; the tokens stay those of unpipelined scheduling."""
    requests = {f"r{i}": (ids, SamplingParams(max_tokens=28, temperature=0, ignore_eos=True))
                for i, ids in enumerate(prompts)}
    for swap in (0, 64):
        results, seen = {}, None
        for pipelined in (True, False):
            engine, bm = make_engine(block_size=BS, num_blocks=24, num_cpu_blocks=swap, async_scheduling=pipelined)
            watched = watch(engine)
            results[pipelined] = run(engine, requests)
            assert used(bm) == 0
            if pipelined:
                seen = watched
        assert results[True] == results[False]
        assert seen["preempted_ahead"] > 0, seen


def test_over_the_service_the_round_trip_is_pipelined(blockmgr_service, smollm, make_engine, prompts):
    model, tok = smollm
    service = blockmgr_service
    engine = Engine(model, service, EngineConfig(block_size=BS, num_blocks=256), {tok.eos_token_id})
    seen = watch(engine)
    requests = {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompts)}
    got = run(engine, requests)
    reference, _ = make_engine(block_size=BS, async_scheduling=False)
    assert got == run(reference, requests)
    assert seen["ahead"] >= 15 and used(service) == 0


def drain(engine, got: dict) -> dict:
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return got


def unpipelined(make_engine, requests: dict, **config) -> dict:
    engine, bm = make_engine(block_size=BS, async_scheduling=False, **config)
    got = run(engine, requests)
    assert used(bm) == 0
    return got


def test_a_request_id_sent_again_while_its_old_step_is_in_flight(make_engine, blockmgr_service, smollm, prompts):
    """The executor aborts a request whose output it could not deliver and the gateway resumes it
    under the same id, possibly here (gateway/generation.py): the reply in flight, about the old
    sequence, must not land on the new request (its block table, or a preemption)."""
    model, tok = smollm
    requests = {"a": (prompts[0], GREEDY), "b": (prompts[1], GREEDY)}
    reference = unpipelined(make_engine, requests)
    in_process, bm = make_engine(block_size=BS)
    for engine, client in ((in_process, bm),
                           (Engine(model, blockmgr_service, EngineConfig(block_size=BS, num_blocks=256),
                                   {tok.eos_token_id}), blockmgr_service)):
        for rid, (ids, params) in requests.items():
            engine.add_request(rid, ids, params)
        got = {"a": [], "b": []}
        # Until a step is in flight whose reply gives "a" a new block.
        while not (engine._ahead is not None and engine.requests["a"].num_computed_tokens % BS == 0):
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
        assert engine.abort("a")
        engine.add_request("a", prompts[0], GREEDY, output_token_ids=list(got["a"]))
        assert drain(engine, got) == reference and used(client) == 0


def test_a_request_id_sent_again_while_its_old_sequence_is_preempted_in_flight(make_engine, prompts):
    long = SamplingParams(max_tokens=28, temperature=0, ignore_eos=True)
    requests = {f"r{i}": (ids, long) for i, ids in enumerate(prompts)}

    def start():
        engine, bm = make_engine(block_size=BS, num_blocks=24)
        for rid, (ids, params) in requests.items():
            engine.add_request(rid, ids, params)
        return engine, bm

    engine, _ = start()  # find a step whose reply, read after the pass, preempts someone
    seen = watch(engine)
    replies = []
    finish = engine.link.finish
    engine.link.finish = lambda: replies.append((engine._num_steps, finish())) or replies[-1][1]
    while engine.has_work() and not seen["preempted_ahead"]:
        engine.step()
    step, reply = next((n, r) for n, r in replies if r and r["preempted"])
    victim = next(iter(reply["preempted"]))
    engine, bm = start()  # the same run up to there; the victim is resumed under its id meanwhile
    got = {}
    while engine._num_steps < step:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert engine._ahead is not None
    engine.abort(victim)
    engine.add_request(victim, requests[victim][0], long, output_token_ids=got[victim])
    assert drain(engine, got) == unpipelined(make_engine, requests, num_blocks=24) and used(bm) == 0


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize("ending", ["length", "stop", "abort"])
def test_a_continued_conversation_hits_the_whole_history_however_the_turn_ended(make_engine, prompts, pipelined,
                                                                                 ending):
    """The block holding a finished request's last computed token is published to the prefix
    cache even where that token's id went to the block manager as pending."""
    prompt = prompts[0]
    engine, bm = make_engine(block_size=BS, async_scheduling=False)
    full = run(engine, {"ref": (prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))})["ref"]
    # End after m tokens, m chosen so that the last computed token (the m-1st) fills a block.
    m = next(m for m in range(8, 8 + BS) if (len(prompt) + m - 1) % BS == 0 and full[m - 1] not in full[: m - 1])
    params = {"length": SamplingParams(max_tokens=m, temperature=0, ignore_eos=True),
              "stop": SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[full[m - 1]]),
              "abort": GREEDY}[ending]
    engine, bm = make_engine(block_size=BS, async_scheduling=pipelined)
    engine.add_request("turn1", prompt, params)
    answer = []
    while engine.has_work() and len(answer) < m:
        for out in engine.step():
            answer += out.new_token_ids
    if ending == "abort":
        assert engine.abort("turn1")
    drain(engine, {})
    assert answer == full[:m]
    engine.add_request("turn2", prompt + answer + [13], SamplingParams(max_tokens=1, temperature=0))
    cached = [out.num_cached_tokens for out in engine.step() if out.request_id == "turn2"]
    drain(engine, {})
    assert cached == [(len(prompt) + m - 1) // BS * BS], "every computed position of turn 1 is cached"
    assert used(bm) == 0


class LosesAReply(InProcessBlockManager):
    """Loses the reply of the next step sent ahead: ``mode`` "after" it was applied, "before" it
    arrived, or "restart": applied, then the block manager restarts from a snapshot taken before."""

    def __init__(self):
        super().__init__(BlockManager())
        self.mode = None

    def send_step(self, executor_id, step_id=None, incarnation=None, **lists):
        mode, self.mode = self.mode, None
        sent = super().send_step(executor_id, step_id=step_id, incarnation=incarnation, **lists)
        if mode is None:
            return sent

        def lost():
            if mode == "restart":
                snapshot = self.manager.snapshot(executor_id)
                sent.reply()
                self.manager = BlockManager()
                self.manager.restore(snapshot)
            elif mode == "after":
                sent.reply()
            raise BlockManagerUnavailable("reply lost")

        return PendingStep(lost)


@pytest.mark.parametrize("mode", ["after", "before", "restart", "forgotten"])
def test_a_step_in_flight_whose_reply_is_lost_or_whose_block_manager_forgot_everything(make_engine, smollm, prompts,
                                                                                        mode):
    model, tok = smollm
    requests = {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompts)}
    bm = LosesAReply()
    engine = Engine(model, bm, EngineConfig(block_size=BS, num_blocks=256), {tok.eos_token_id})
    engine.link.patience_s = 5
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    got = {}
    while engine._num_steps < 6 or engine._ahead is None:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    if mode == "forgotten":
        bm.manager = BlockManager()  # restarted without Redis before the step in flight arrives
    else:
        bm.mode = mode  # the next step sent ahead
    drain(engine, got)
    assert bm.mode is None, "a step was sent ahead through the lossy send"
    assert got == unpipelined(make_engine, requests) and used(bm) == 0


def test_abort_by_index_and_endings_at_the_context_length(make_engine, prompts):
    max_model_len = max(len(p) for p in prompts) + 12
    requests = {rid: (p, SamplingParams(max_tokens=max_model_len - len(p), temperature=0, ignore_eos=True))
                for rid, p in zip("abcd", prompts)}
    for pipelined in (True, False):
        engine, bm = make_engine(block_size=BS, async_scheduling=pipelined, max_model_len=max_model_len)
        for rid, (ids, params) in requests.items():
            engine.add_request(rid, ids, params)
        got = {}
        while engine.has_work():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
                assert not out.finished or out.finish_reason in ("length", "abort")
            if len(got.get("b", [])) == 5 and engine.requests.get("b"):
                assert engine.abort("b", 0)
        assert len(got["b"]) == 5 and all(len(got[r]) == requests[r][1].max_tokens for r in "acd")
        assert used(bm) == 0


def test_a_saturated_engine_with_a_queue_still_pipelines(make_engine, prompts):
    """More requests than max_num_seqs: the rest wait, and the running ones are still sent ahead;
    each waiting request is admitted in the step after a seat frees, as one step at a time."""
    requests = {f"r{i}": (ids, SamplingParams(max_tokens=12 + 3 * i, temperature=0, ignore_eos=True))
                for i, ids in enumerate(prompts)}
    engine, bm = make_engine(block_size=BS, max_num_seqs=2)
    engine.record_steps = True
    queued = []
    send = engine.link.send
    engine.link.send = lambda **lists: (queued.append(len(engine.scheduler.waiting)), send(**lists))
    got = run(engine, requests)
    assert got == unpipelined(make_engine, requests, max_num_seqs=2)
    assert sum(1 for n in queued if n) >= 10, "sent ahead while requests waited"
    assert used(bm) == 0
    reference, _ = make_engine(block_size=BS, max_num_seqs=2, async_scheduling=False)
    reference.record_steps = True
    run(reference, requests)
    assert [r.scheduled for r in engine.step_records] == [r.scheduled for r in reference.step_records]
