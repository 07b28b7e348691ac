"""Sampling parameters through the engine and the executor's wire format (SmolLM2, CPU)."""

import threading

import pytest
import zmq

from executor import protocol
from executor.request import SamplingParams
from executor.server import ExecutorServer

BS = 8
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def prompt_ids(smollm):
    return smollm[1].encode(PROMPT)


@pytest.fixture(scope="module")
def greedy_ids(make_engine, prompt_ids):
    return make_engine(block_size=BS)[0].generate([prompt_ids], SamplingParams(max_tokens=4, temperature=0))[0]


def test_stop_token_ids_and_min_tokens(make_engine, prompt_ids, greedy_ids):
    engine, _ = make_engine(block_size=BS)
    first = greedy_ids[0]
    stopped = engine.generate([prompt_ids], SamplingParams(max_tokens=4, temperature=0, stop_token_ids=[first]))
    assert stopped == [[first]]
    # With min_tokens=2 the stop token cannot come first, nor second.
    held = engine.generate([prompt_ids], SamplingParams(max_tokens=4, temperature=0, min_tokens=2,
                                                        stop_token_ids=[first]))[0]
    assert len(held) >= 2 and first not in held[:2]


def test_priority_decides_admission(make_engine, prompt_ids):
    engine, _ = make_engine(block_size=BS, max_num_seqs=1)
    engine.record_steps = True
    p = SamplingParams(max_tokens=2, temperature=0)
    engine.add_request("background", prompt_ids, p, priority=3)
    engine.add_request("urgent", prompt_ids, p, priority=-1)
    engine.add_request("normal", prompt_ids, p)
    while engine.has_work():
        engine.step()
    order = []
    for rec in engine.step_records:
        for rid in rec.scheduled:
            if rid not in order:
                order.append(rid)
    assert order == ["urgent", "normal", "background"]


def test_wire_format_carries_logprobs_and_prompt_logprobs(make_engine, prompt_ids, greedy_ids, free_port):
    address = f"tcp://127.0.0.1:{free_port()}"
    server = ExecutorServer(make_engine(block_size=BS)[0], address, {"executor_id": "executor-0"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.connect(address)
    try:
        sock.send(protocol.encode({"op": "generate", "request_id": "bad", "prompt_token_ids": prompt_ids,
                                   "params": {"logprobs": 99}}))
        refused = protocol.decode(sock.recv())
        assert refused["finish_reason"] == "error" and "logprobs" in refused["error"]
        params = {"max_tokens": 4, "temperature": 0, "logprobs": 2, "prompt_logprobs": 1}
        sock.send(protocol.encode({"op": "generate", "request_id": "r", "prompt_token_ids": prompt_ids,
                                   "params": params, "priority": 2}))
        outputs = []
        while not (outputs and outputs[-1]["finished"]):
            outputs.append(protocol.decode(sock.recv()))
    finally:
        server.stopping = True
        thread.join(10)
        sock.close()
        server.sock.close()
    assert [t for o in outputs for t in o["token_ids"]] == greedy_ids
    for o in outputs:
        assert len(o["logprobs"]) == len(o["token_ids"])
        for t, e in zip(o["token_ids"], o["logprobs"]):
            assert e["token_id"] == t and e["logprob"] <= 0 and len(e["top"]) == 2
            assert e["top"][0][0] == t  # greedy: the sampled token is the most likely
    first = outputs[0]["prompt_logprobs"]
    assert len(first) == len(prompt_ids) and first[0] is None
    assert [e["token_id"] for e in first[1:]] == prompt_ids[1:]
    assert all(len(e["top"]) == 1 for e in first[1:])
    assert all(o["prompt_logprobs"] is None for o in outputs[1:])
