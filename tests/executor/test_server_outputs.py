"""The executor sends a step's outputs as one ``outputs`` message per gateway (executor/server.py),
each gateway only its own requests', an output with prompt logprobs on its own."""

import logging
import threading
import time
from types import SimpleNamespace

import zmq

from executor import protocol
from executor.outputs import RequestOutput
from executor.server import ExecutorServer


class ScriptedEngine:
    """Just enough of an Engine: every request added gets one token per step for ``steps`` steps;
    requests named ``*-plp`` carry prompt logprobs on their first output."""

    def __init__(self, steps: int):
        self.steps = steps
        self.requests: dict[str, int] = {}  # request id -> steps done
        self.aborted: list[str] = []
        self.scheduler = SimpleNamespace(running=[], waiting=[], swapped=[])
        self.go = threading.Event()

    def add_request(self, rid, prompt, params, **kwargs):
        self.requests[rid] = 0

    def abort(self, rid, index=None):
        self.aborted.append(rid)
        self.requests.pop(rid, None)
        return True

    def has_work(self) -> bool:
        return self.go.is_set() and bool(self.requests)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for rid in sorted(self.requests):
            done = self.requests[rid] = self.requests[rid] + 1
            finished = done == self.steps
            plp = [None, {"token_id": 1, "logprob": -0.5, "top": []}] if rid.endswith("-plp") and done == 1 else None
            outputs.append(RequestOutput(rid, [100 + done], finished, "length" if finished else None,
                                         num_prompt_tokens=2, prompt_logprobs=plp))
        for rid in [r for r, d in self.requests.items() if d == self.steps]:
            del self.requests[rid]
        return outputs


def _dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(address)
    return sock


def _messages_until_finished(sock: zmq.Socket, request_ids: set[str]) -> list[dict]:
    messages, unfinished = [], set(request_ids)
    while unfinished:
        msg = protocol.decode(sock.recv())
        messages.append(msg)
        outputs = msg["outputs"] if msg["op"] == "outputs" else [msg]
        unfinished -= {o["request_id"] for o in outputs if o["finished"]}
    return messages


def test_one_message_per_step_and_gateway_each_with_its_own_requests(free_port):
    address = f"tcp://127.0.0.1:{free_port()}"
    engine = ScriptedEngine(steps=3)
    server = ExecutorServer(engine, address, {"executor_id": "executor-0"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    a, b = _dealer(address), _dealer(address)
    try:
        for sock, rids in ((a, ["a1", "a2", "a3-plp"]), (b, ["b1"])):
            for rid in rids:
                sock.send(protocol.encode({"op": "generate", "request_id": rid, "prompt_token_ids": [1, 2]}))
        deadline = time.monotonic() + 10
        while len(engine.requests) < 4:  # every request in before the first step
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.go.set()
        got_a = _messages_until_finished(a, {"a1", "a2", "a3-plp"})
        got_b = _messages_until_finished(b, {"b1"})
    finally:
        server.stopping = True
        thread.join(10)
        a.close()
        b.close()
        server.sock.close()
    # Gateway a: step 1 sends a3's first output (with its prompt logprobs) alone and a1 and a2
    # together; steps 2 and 3 one message each with all three.
    assert [m["op"] for m in got_a] == ["output", "outputs", "outputs", "outputs"]
    assert got_a[0]["request_id"] == "a3-plp" and got_a[0]["prompt_logprobs"][0] is None
    assert [o["request_id"] for o in got_a[1]["outputs"]] == ["a1", "a2"]
    for step, msg in zip((2, 3), got_a[2:]):
        assert [(o["request_id"], o["token_ids"]) for o in msg["outputs"]] == [
            ("a1", [100 + step]), ("a2", [100 + step]), ("a3-plp", [100 + step])]
        assert all("op" not in o for o in msg["outputs"])
    assert [o["finished"] for o in got_a[-1]["outputs"]] == [True, True, True]
    # Gateway b: its lone request's outputs, one per step, as plain output messages.
    assert [(m["op"], m["request_id"], m["token_ids"]) for m in got_b] == [
        ("output", "b1", [101]), ("output", "b1", [102]), ("output", "b1", [103])]
    assert server.owner == {} and engine.aborted == []


def test_a_batch_that_cannot_be_delivered_aborts_its_unfinished_requests(free_port, caplog):
    address = f"tcp://127.0.0.1:{free_port()}"
    engine = ScriptedEngine(steps=3)
    server = ExecutorServer(engine, address, {"executor_id": "executor-0"})
    server.owner = {"r1": [b"gone", 1, None], "r2": [b"gone", 1, None], "r3": [b"gone", 1, None]}
    engine.requests = {"r1": 0, "r2": 0, "r3": 2}
    try:
        # r3 finishes in this step; r1 and r2 would go on. No gateway has identity b"gone".
        with caplog.at_level(logging.WARNING, logger="pagedserve.executor"):
            server._send_outputs(engine.step())
    finally:
        server.sock.close()
    assert sorted(engine.aborted) == ["r1", "r2"]
    assert server.owner == {}
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("cannot deliver 3 output(s) of request(s) r1, r2, r3 to its gateway (")
