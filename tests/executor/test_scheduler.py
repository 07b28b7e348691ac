"""The scheduler alone: one token budget, decode-first, max_num_seqs, (priority, arrival) order."""

import pytest

from executor.request import Request, SamplingParams, Status
from executor.scheduler import Scheduler


def make(rid, prompt_len, priority=0):
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(), priority=priority)


def advance(batch):
    """What the engine does after a step: tokens computed, one sampled where the prompt is done."""
    for req, n in batch:
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(7)


def ids(batch):
    return [(r.request_id, n) for r, n in batch]


def test_one_budget_shared_by_decodes_and_prefill_chunks():
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=10)
    for i in range(3):
        s.add(make(f"d{i}", 2))
    advance(s.schedule())  # 3 prompts of 2 tokens: all in, each samples a token
    s.add(make("long", 30))
    steps = []
    while True:
        batch = s.schedule()
        if not batch or ("long", 1) in ids(batch):
            break
        steps.append(ids(batch))
        assert sum(n for _, n in batch) <= 10
        advance(batch)
    # Every step: the 3 decodes first (1 token each), the long prompt gets the other 7.
    assert steps[:4] == [[("d0", 1), ("d1", 1), ("d2", 1), ("long", 7)]] * 4
    assert steps[4] == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 2)]


def test_an_older_prefill_cannot_starve_decodes():
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make("old", 60), make("new", 3)
    s.add(old)
    s.add(new)
    advance(s.schedule())  # both prompts in, both decoding
    s.preempt(old)  # recomputed later: a 61-token prefill, older than "new"
    s.max_num_batched_tokens = 8
    steps = 0
    while old.num_computed_tokens < 61:
        batch = s.schedule()
        assert ids(batch)[0] == ("new", 1) and sum(n for _, n in batch) <= 8
        advance(batch)
        steps += 1
    assert steps == 9  # 61 tokens, 7 a step


def test_max_num_seqs_and_fcfs_admission():
    s = Scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        s.add(make(f"r{i}", 5))
    assert ids(s.schedule()) == [("r0", 5), ("r1", 5)]
    assert [r.request_id for r in s.waiting] == ["r2", "r3"]


def test_priority_then_arrival():
    s = Scheduler(max_num_seqs=3, max_num_batched_tokens=100)
    for rid, prio in [("a", 0), ("b", 1), ("c", -1), ("d", 0), ("e", -1)]:
        s.add(make(rid, 4, prio))
    assert [r.request_id for r in s.waiting] == ["c", "e", "a", "d", "b"]
    assert [r for r, _ in ids(s.schedule())] == ["c", "e", "a"]


def test_preempted_and_unadmitted_go_back_to_their_place():
    s = Scheduler(max_num_seqs=4, max_num_batched_tokens=100)
    for rid in "abc":
        s.add(make(rid, 4))
    batch = s.schedule()
    advance(batch)
    s.add(make("late", 4))
    a = batch[0][0]
    s.preempt(a)  # recompute: back to waiting, ahead of the later arrival
    assert a.num_computed_tokens == 0 and a.status is Status.WAITING and a.num_preemptions == 1
    assert [r.request_id for r in s.waiting] == ["a", "late"]
    s.add(make("urgent", 4, priority=-5))
    assert [r.request_id for r in s.waiting] == ["urgent", "a", "late"]
    batch = s.schedule()
    assert [r.request_id for r, _ in batch][-2:] == ["urgent", "a"]
    s.unadmit(batch[-1][0])
    assert [r.request_id for r in s.waiting] == ["a", "late"]


def test_decodes_in_priority_order_when_the_budget_is_short():
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    reqs = [make("low", 2, 5), make("high", 2, -5), make("mid", 2, 0)]
    for r in reqs:
        s.add(r)
    advance(s.schedule())
    s.max_num_batched_tokens = 2
    assert ids(s.schedule()) == [("high", 1), ("mid", 1)]


def test_remove_forgets_the_request():
    s = Scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    r = make("x", 3)
    s.add(r)
    s.remove(r)
    assert not s.has_work() and "x" not in s._arrival


def test_bad_limits():
    with pytest.raises(ValueError):
        Scheduler(0, 10)
    with pytest.raises(ValueError):
        Scheduler(1, 0)
