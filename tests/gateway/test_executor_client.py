"""The gateway's ZeroMQ client of an executor, against a scripted ROUTER socket (no model)."""

import asyncio

import pytest
import zmq
import zmq.asyncio

from executor import protocol
from executor.client import ExecutorClient, ExecutorUnavailable
from gateway.executors import ExecutorPool


class ScriptedExecutor:
    """A ROUTER socket that records what it gets and answers as told."""

    def __init__(self, address: str):
        self.sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.peer = None
        self.received: list[dict] = []

    async def recv(self) -> dict:
        frames = await self.sock.recv_multipart()
        self.peer = frames[0]
        msg = protocol.decode(frames[-1])
        self.received.append(msg)
        return msg

    async def send(self, **msg) -> None:
        await self.sock.send_multipart([self.peer, protocol.encode(msg)])

    async def output(self, rid, index, tokens, finished=False, reason=None, error=None):
        await self.send(op="output", request_id=rid, index=index, token_ids=tokens, finished=finished,
                        finish_reason=reason, error=error, num_prompt_tokens=3, num_cached_tokens=0)

    def close(self):
        self.sock.close()


@pytest.fixture
def address(free_port):
    return f"tcp://127.0.0.1:{free_port()}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_n_children_finish_the_request_only_when_all_have(address):
    async def main():
        ex = ScriptedExecutor(address)
        client = ExecutorClient(address)
        await client.start()
        gen = client.generate("r1", [1, 2, 3], {"max_tokens": 2, "n": 2}, priority=5, cache_salt="s")
        first = asyncio.ensure_future(gen.__anext__())
        sent = await ex.recv()
        assert sent["op"] == "generate" and sent["priority"] == 5 and sent["cache_salt"] == "s"
        await ex.output("r1", 0, [7])
        assert (await first)["token_ids"] == [7]
        await ex.output("r1", 0, [8], True, "length")
        await ex.output("r1", 1, [9], True, "stop")
        got = [m async for m in gen]
        assert [(m["index"], m["finished"]) for m in got] == [(0, True), (1, True)]
        assert client.num_active == 0
        await client.close()
        ex.close()

    run(main())


def test_a_step_batch_reaches_each_request_and_a_malformed_one_is_skipped(address):
    async def main():
        ex = ScriptedExecutor(address)
        client = ExecutorClient(address)
        await client.start()
        gens = {rid: client.generate(rid, [1, 2, 3], {"max_tokens": 2}) for rid in ("b1", "b2")}
        nexts = {rid: asyncio.ensure_future(g.__anext__()) for rid, g in gens.items()}
        assert {(await ex.recv())["request_id"] for _ in gens} == {"b1", "b2"}

        def out(rid, token, finished):
            return {"request_id": rid, "index": 0, "token_ids": [token], "finished": finished,
                    "finish_reason": "length" if finished else None, "error": None,
                    "num_prompt_tokens": 3, "num_cached_tokens": 0}

        await ex.send(op="outputs", outputs=[out("b1", 7, False), out("b2", 8, False)])
        first = {rid: await n for rid, n in nexts.items()}
        assert {rid: (m["op"], m["token_ids"]) for rid, m in first.items()} == {
            "b1": ("output", [7]), "b2": ("output", [8])}
        await ex.send(op="outputs", outputs="not a list")  # logged and skipped
        await ex.send(op="outputs", outputs=[out("b1", 9, True), "not a map", {**out("b1", 0, False), "request_id": ["x"]},
                                             out("b2", 10, True)])
        rest = {rid: [m["token_ids"] async for m in g] for rid, g in gens.items()}
        assert rest == {"b1": [[9]], "b2": [[10]]}
        assert client.num_active == 0
        await client.close()
        ex.close()

    run(main())


def test_stopping_early_sends_abort_even_when_cancelled(address):
    async def main():
        ex = ScriptedExecutor(address)
        client = ExecutorClient(address)
        await client.start()

        async def consume():
            async for _ in client.generate("r2", [1], {"max_tokens": 50}):
                pass

        task = asyncio.ensure_future(consume())
        assert (await ex.recv())["op"] == "generate"
        await ex.output("r2", 0, [5])
        await asyncio.sleep(0.05)
        task.cancel()  # the client disconnected
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(ex.recv(), 2) == {"op": "abort", "request_id": "r2"}
        await client.close()
        ex.close()

    run(main())


def test_errors_end_the_request_and_requests_time_out(address):
    async def main():
        ex = ScriptedExecutor(address)
        client = ExecutorClient(address)
        await client.start()
        gen = client.generate("r3", [1], {"max_tokens": 5, "n": 3})
        nxt = asyncio.ensure_future(gen.__anext__())
        await ex.recv()
        await ex.output("r3", 0, [], True, "error", "bad parameter")
        assert (await nxt)["error"] == "bad parameter"
        assert [m async for m in gen] == []

        info = asyncio.ensure_future(client.request("info", timeout_s=2))
        req = await ex.recv()
        await ex.send(op="reply", nonce=req["nonce"], executor_id="e0", num_blocks=4)
        assert (await info)["executor_id"] == "e0"
        with pytest.raises(ExecutorUnavailable):
            await client.request("ping", timeout_s=0.2)  # never answered
        await client.close()
        ex.close()

    run(main())


def test_a_silent_executor_fails_its_requests(address):
    async def main():
        ex = ScriptedExecutor(address)
        client = ExecutorClient(address)
        pool = ExecutorPool([client], health_interval_s=0.1, executor_timeout_s=0.3)
        await client.start()
        pool._monitor = asyncio.ensure_future(pool._monitor_loop())
        msgs = [m async for m in client.generate("r4", [1], {"max_tokens": 5})]  # nobody ever answers
        assert len(msgs) == 1 and msgs[0]["unavailable"] and "has not answered" in msgs[0]["error"]
        assert not pool.handles[0].healthy
        await pool.close()
        ex.close()

    run(main())
