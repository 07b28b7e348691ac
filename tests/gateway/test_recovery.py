"""Requests that outlive their executor: resume elsewhere, wait for one to come back, deadlines,
and fast detection of a dead executor (fake executors, and a real ZeroMQ socket for detection)."""

import asyncio
import concurrent.futures
import json
import random
import threading
import time

import httpx
import pytest
import zmq
import zmq.asyncio

from executor.client import ExecutorClient, ExecutorUnavailable
from executor.request import seed_for_child
from tests.gateway.fakes import fake_app, serve_in_thread

MODEL = "fake-model"


def choice_texts(base, body, on_tokens=None, after=0):
    """Stream ``body``; returns ({choice index: text}, {index: finish}, error, done)."""
    texts, finishes, error, done, chunks = {}, {}, None, False, 0
    with httpx.stream("POST", base + "/v1/completions", json={"model": MODEL, "stream": True, **body},
                      timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
                continue
            for c in event["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + (c.get("text") or "")
                if c.get("finish_reason"):
                    finishes[c["index"]] = c["finish_reason"]
            chunks += 1
            if on_tokens is not None and chunks == after:
                on_tokens()
    return texts, finishes, error, done


def stream(base, body, on_tokens=None, after=0):
    """POST a streamed completion; returns (text, finish_reason, error event or None, ended with [DONE]).

    ``on_tokens`` is called once after ``after`` content chunks arrived (to kill an executor mid-way).
    """
    texts, finishes, error, done = choice_texts(base, body, on_tokens, after)
    return texts.get(0, ""), finishes.get(0), error, done


def busy(executors):
    return next(e for e in executors if e._running)


BODY = {"prompt": "Tell me something.", "max_tokens": 20, "ignore_eos": True, "temperature": 0}


def test_in_flight_request_resumes_on_another_executor_and_continues_exactly(tok):
    app, executors, bm = fake_app(tok, num_executors=2, executor_kwargs={"token_delay_s": 0.02})
    with serve_in_thread(app) as base:
        reference = stream(base, BODY)
        assert reference[1] == "length" and reference[3]
        victim = []
        text, finish, error, done = stream(base, BODY, lambda: victim.append(busy(executors)) or victim[0].crash(),
                                           after=5)
        assert (text, finish, error, done) == reference
        survivor = next(e for e in executors if e is not victim[0])
        resumed = survivor.received[-1]
        assert 5 <= len(resumed["output_token_ids"]) < 20, "sent again with the tokens already streamed"
        assert resumed["prompt_token_ids"] == executors[0].received[0]["prompt_token_ids"]
        assert bm.stats()[survivor.executor_id]["device"]["used"] == 0


def test_request_waits_for_its_only_executor_to_come_back(tok):
    app, executors, bm = fake_app(tok, num_executors=1, executor_kwargs={"token_delay_s": 0.02})
    with serve_in_thread(app) as base:
        reference = stream(base, BODY)

        def crash_and_restart():
            executors[0].crash()
            threading.Timer(0.6, executors[0].restart).start()

        assert stream(base, BODY, crash_and_restart, after=4) == reference


def test_no_executor_left_ends_the_stream_with_an_error_and_done(tok):
    app, executors, bm = fake_app(tok, num_executors=1, executor_kwargs={"token_delay_s": 0.02},
                                  request_timeout_s=1.5)
    with serve_in_thread(app) as base:
        t0 = time.monotonic()
        text, finish, error, done = stream(base, BODY, executors[0].crash, after=3)
        assert error["code"] == "executor_unavailable" and "deadline" in error["message"] and done
        assert finish is None and time.monotonic() - t0 < 5


def seeded_reply(prompt_ids, params, index):
    """A continuation that depends on the choice's own seed, as a real child's sampling does: choice
    ``index`` of a request seeded ``s`` draws from ``seed_for_child(s, index)``, as does a lone
    request seeded with that."""
    seed = seed_for_child(params.get("seed"), index)
    rng = random.Random(seed)
    return [rng.randrange(300, 5000) for _ in range(int(params.get("max_tokens", 16)))]


N_BODY = {**BODY, "n": 3, "temperature": 0.8, "seed": 1234}


def test_n_greater_than_one_resumes_each_choice_alone_with_its_derived_seed(tok):
    app, executors, bm = fake_app(tok, num_executors=2, executor_kwargs={"token_delay_s": 0.02,
                                                                          "reply": seeded_reply})
    with serve_in_thread(app) as base:
        reference = choice_texts(base, N_BODY)
        assert len(reference[0]) == 3 and len(set(reference[0].values())) == 3 and reference[3]
        victim = []
        result = choice_texts(base, N_BODY, lambda: victim.append(busy(executors)) or victim[0].crash(), after=6)
        assert result == reference
        survivor = next(e for e in executors if e is not victim[0])
        legs = [m for m in survivor.received if "/" in m["request_id"]]
        assert sorted(int(m["request_id"].rsplit("/", 1)[1].split(".")[0]) for m in legs) == [0, 1, 2]
        for m in legs:
            index = int(m["request_id"].rsplit("/", 1)[1].split(".")[0])
            assert m["params"]["n"] == 1 and m["params"]["seed"] == seed_for_child(1234, index)
            assert 1 <= len(m["output_token_ids"]) < 20, "sent again with that choice's tokens"
            assert m["output_token_ids"] == seeded_reply(None, N_BODY, index)[:len(m["output_token_ids"])]
        for e in executors:
            assert bm.stats()[e.executor_id]["device"]["used"] == 0


def test_a_resumed_choice_whose_executor_dies_again_resumes_alone_once_more(tok):
    app, executors, bm = fake_app(tok, num_executors=2, executor_kwargs={"token_delay_s": 0.03,
                                                                          "reply": seeded_reply})
    with serve_in_thread(app) as base:
        reference = choice_texts(base, N_BODY)
        def lose_both_in_turn():
            first_busy = busy(executors)
            other = executors[1] if first_busy is executors[0] else executors[0]
            first_busy.crash()  # the legs go to the other one

            def swap():
                first_busy.restart()  # back, empty: the legs come back here when the other dies
                other.crash()

            threading.Timer(0.3, swap).start()
            lost.extend([first_busy, other])

        lost = []
        result = choice_texts(base, N_BODY, lose_both_in_turn, after=4)
        assert result == reference
        back_again = [m for m in lost[0].received if "/" in m["request_id"]]
        assert sorted(int(m["request_id"].rsplit("/", 1)[1].split(".")[0]) for m in back_again) == [0, 1, 2]
        assert all(len(m["output_token_ids"]) > 2 for m in back_again), "each leg continued from its own tokens"
        assert bm.stats()[lost[0].executor_id]["device"]["used"] == 0


def test_beam_search_restarts_on_another_executor_with_the_same_result(tok):
    body = {**BODY, "use_beam_search": True, "best_of": 2}
    app, executors, bm = fake_app(tok, num_executors=2, executor_kwargs={"token_delay_s": 0.02})
    with serve_in_thread(app) as base:
        reference = httpx.post(base + "/v1/completions", json={"model": MODEL, **body}, timeout=30).json()
        assert reference["choices"][0]["finish_reason"] == "length"

        def crash_when_busy():
            deadline = time.monotonic() + 5
            while not any(e._running for e in executors) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)  # mid-way through its 20 steps
            busy(executors).crash()

        killer = threading.Thread(target=crash_when_busy)
        killer.start()
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, **body}, timeout=30)
        killer.join()
        assert r.status_code == 200, r.text
        assert r.json()["choices"] == reference["choices"]
        crashed = [e for e in executors if e._crashed]
        assert len(crashed) == 1 and sum(len(e.received) for e in executors) == 3, "sent twice, once per executor"
        restarted = next(e for e in executors if not e._crashed).received[-1]
        assert restarted["output_token_ids"] == [] and restarted["params"]["use_beam_search"]


def test_deadline_ends_the_request_and_frees_its_blocks(tok):
    app, executors, bm = fake_app(tok, num_executors=1, executor_kwargs={"token_delay_s": 0.2},
                                  request_timeout_s=0.8)
    with serve_in_thread(app) as base:
        t0 = time.monotonic()
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, **BODY}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert time.monotonic() - t0 < 3
        text, finish, error, done = stream(base, BODY)
        assert error["code"] == "deadline_exceeded" and done and 0 < len(text)
        deadline = time.monotonic() + 3
        while bm.stats()["executor-0"]["device"]["used"]:
            assert time.monotonic() < deadline, "the aborted request's blocks were not freed"
            time.sleep(0.05)
        assert executors[0].aborted, "the executor was told to stop"


def test_client_notices_a_dead_executor_within_two_seconds(free_port):
    """A real ZeroMQ connection: the executor's socket goes away (as when its process is killed)."""
    address = f"tcp://127.0.0.1:{free_port()}"

    async def main():
        ctx = zmq.asyncio.Context.instance()
        server = ctx.socket(zmq.ROUTER)
        server.setsockopt(zmq.LINGER, 0)
        server.bind(address)
        client = ExecutorClient(address)
        lost = asyncio.Event()
        client.on_disconnect = lost.set
        await client.start()
        gen = client.generate("r1", [1, 2, 3], {"max_tokens": 4})
        first = asyncio.ensure_future(gen.__anext__())
        await server.recv_multipart()
        for _ in range(200):  # the handshake's monitor event may be read after the first message
            if client.connected:
                break
            await asyncio.sleep(0.01)
        assert client.connected
        t0 = time.monotonic()
        server.close()
        msg = await asyncio.wait_for(first, 2.0)
        assert msg["finish_reason"] == "error" and msg["unavailable"] and "lost the connection" in msg["error"]
        await asyncio.wait_for(lost.wait(), 2.0)
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(ExecutorUnavailable, match="disconnected"):
            await client.request("info", timeout_s=0.5)
        await gen.aclose()
        await client.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_request_field_shortens_the_deadline_but_never_extends_it(tok):
    app, executors, bm = fake_app(tok, num_executors=1, executor_kwargs={"token_delay_s": 0.1},
                                  request_timeout_s=2.5)
    with serve_in_thread(app) as base:
        for asked, limit in ((1, 1), (30, 2.5)):
            t0 = time.monotonic()
            r = httpx.post(base + "/v1/completions", json={"model": MODEL, **BODY, "max_tokens": 60,
                                                           "request_timeout": asked}, timeout=30)
            took = time.monotonic() - t0
            assert r.status_code == 504 and f"deadline of {limit:g}s" in r.json()["error"]["message"]
            assert limit <= took < limit + 1.5
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, **BODY, "request_timeout": 0.5}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "request_timeout"


def test_a_hung_executor_is_declared_dead_and_its_request_resumes_elsewhere(tok):
    app, executors, bm = fake_app(tok, num_executors=2, executor_kwargs={"token_delay_s": 0.02},
                                  executor_timeout_s=1.0)
    with serve_in_thread(app) as base:
        reference = stream(base, BODY)
        hung = []
        t0 = time.monotonic()
        result = stream(base, BODY, lambda: hung.append(busy(executors)) or hung[0].hang(), after=5)
        assert result == reference
        assert time.monotonic() - t0 < 1.0 + 3.0, "noticed after about executor_timeout_s, not 60 s"
        survivor = next(e for e in executors if e is not hung[0])
        assert 5 <= len(survivor.received[-1]["output_token_ids"]) < 20
        admin = httpx.get(base + "/admin/executors", timeout=10).json()
        states = {e["executor_id"]: e for e in (admin["executors"] if isinstance(admin, dict) else admin)}
        assert states[hung[0].executor_id]["healthy"] is False


def test_a_hung_only_executor_ends_the_request_with_a_clear_error(tok):
    app, executors, bm = fake_app(tok, num_executors=1, executor_kwargs={"token_delay_s": 0.02},
                                  executor_timeout_s=0.8, request_timeout_s=3)
    with serve_in_thread(app) as base:
        t0 = time.monotonic()
        text, finish, error, done = stream(base, BODY, executors[0].hang, after=3)
        assert error["code"] == "executor_unavailable" and done and finish is None
        assert time.monotonic() - t0 < 5


def test_the_stall_limit_stretches_to_twice_the_longest_step_reported():
    from gateway.executors import ExecutorPool
    from tests.gateway.fakes import FakeExecutor

    pool = ExecutorPool([FakeExecutor()], executor_timeout_s=10.0)
    h = pool.handles[0]
    for info, limit in (({}, 10.0), ({"longest_step_s": 2.0}, 10.0), ({"longest_step_s": 8.0}, 16.0),
                        ({"longest_step_s": "8"}, 10.0), ({"longest_step_s": -1}, 10.0)):
        h.info = info
        assert pool.stall_limit_s(h) == limit


def test_a_resumed_choice_that_hits_a_stop_string_is_aborted_alone(tok):
    app, executors, bm = fake_app(tok, num_executors=2, executor_kwargs={"token_delay_s": 0.03,
                                                                          "reply": seeded_reply})
    with serve_in_thread(app) as base:
        plain = choice_texts(base, N_BODY)[0]
        # A stop string from late in choice 1's text that no other choice contains.
        stop = next(plain[1][i:i + 6] for i in range(len(plain[1]) * 2 // 3, len(plain[1]) - 6)
                    if all(plain[1][i:i + 6] not in plain[j] for j in (0, 2)))
        body = {**N_BODY, "stop": [stop]}
        reference = choice_texts(base, body)
        assert reference[1][1] == "stop" and reference[1][0] == reference[1][2] == "length"
        victim = []
        result = choice_texts(base, body, lambda: victim.append(busy(executors)) or victim[0].crash(), after=4)
        assert result == reference
        survivor = next(e for e in executors if e is not victim[0])
        leg = next(m["request_id"] for m in survivor.received if m["request_id"].split("/")[-1].startswith("1."))
        deadline = time.monotonic() + 5
        while leg not in survivor.aborted:
            assert time.monotonic() < deadline, "the stopped choice's leg was not aborted"
            time.sleep(0.05)
        assert survivor.num_active == 0 and bm.stats()[survivor.executor_id]["device"]["used"] == 0


def test_an_executor_in_a_long_step_stays_healthy_and_takes_requests(tok):
    """The executor answers ``info`` between steps: a step longer than the probe timeout (1 s) must
    not make it unhealthy while its requests make progress, or requests arriving then are refused."""
    app, executors, bm = fake_app(tok, num_executors=1,
                                  executor_kwargs={"token_delay_s": 0.4, "info_delay_s": 1.5})
    with serve_in_thread(app) as base:
        seen = {}

        def meanwhile():
            time.sleep(2.5)  # two monitor rounds with unanswered probes
            states = httpx.get(base + "/admin/executors", timeout=10).json()["executors"]
            seen["healthy"] = states[0]["healthy"]
            seen["second"] = httpx.post(base + "/v1/completions", json={"model": MODEL, **BODY, "max_tokens": 2},
                                        timeout=30)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            job = pool.submit(meanwhile)
            text, finish, error, done = stream(base, {**BODY, "max_tokens": 12})
            job.result()
        assert error is None and finish == "length" and done
        assert seen["healthy"] is True
        assert seen["second"].status_code == 200, seen["second"].text
