"""The executor's serving loop reports how long its steps take, so the gateway can tell a long step
from a hung loop (gateway.executors.ExecutorPool.stall_limit_s)."""

import threading
import time
from types import SimpleNamespace

import zmq

from executor import protocol
from executor.server import ExecutorServer


class SlowEngine:
    """Just enough of an Engine: ``steps`` steps of ``step_s`` seconds each, no outputs."""

    def __init__(self, steps: int, step_s: float):
        self.steps, self.step_s = steps, step_s
        self.scheduler = SimpleNamespace(running=[], waiting=[], swapped=[])

    def has_work(self) -> bool:
        return self.steps > 0

    def step(self):
        self.steps -= 1
        time.sleep(self.step_s)
        return []


def test_info_reports_the_longest_recent_step(free_port):
    address = f"tcp://127.0.0.1:{free_port()}"
    server = ExecutorServer(SlowEngine(steps=3, step_s=0.2), address, {"executor_id": "executor-0"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(address)
    try:
        deadline = time.monotonic() + 10
        while server.engine.has_work():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sock.send(protocol.encode({"op": "info", "nonce": 1}))
        reply = protocol.decode(sock.recv())
    finally:
        server.stopping = True
        thread.join(10)
        sock.close()
        server.sock.close()
    assert reply["nonce"] == 1 and reply["executor_id"] == "executor-0"
    assert 0.2 * 0.99 ** 2 <= reply["longest_step_s"] < 2.0
