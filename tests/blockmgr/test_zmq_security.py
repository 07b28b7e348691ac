"""The ZeroMQ services against an attacker on the network (issue 13's attacks), and fuzzed.

Each attack of the issue is tried for real, over CURVE sockets, and must fail to do harm:
an unauthenticated or unknown peer gets nothing; an executor cannot act on another executor's
state; a float ``logprobs`` is refused without crashing the executor; an oversize message is
dropped; KV events reach only subscribers with a trusted key. Then hypothesis sends random and
mutated messages to each service: it keeps answering and its books stay balanced.
"""

import contextlib
import copy
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmgr import protocol, security
from blockmgr.client import BlockManagerClient, BlockManagerRequestError, BlockManagerUnavailable, InProcessBlockManager
from blockmgr.manager import BlockManager
from tests.conftest import _free_port
from tests.blockmgr.test_manager import check_books

LIMIT = 64 * 1024  # the services' max message size in these tests


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack") / "keys"
    security.create_keys(d, ["blockmgr", "gateway", "executor-0", "executor-1"])
    return d


@pytest.fixture(scope="module")
def stranger(tmp_path_factory, keys_dir):
    """Well-formed keys the stack does not trust, and the stack's public keys (which are no secret)."""
    d = tmp_path_factory.mktemp("elsewhere") / "keys"
    security.create_keys(d, ["gateway", "impostor"])
    for name in ("blockmgr", "executor-0"):
        shutil.copy(keys_dir / f"{name}.key", d / f"{name}.key")
    return d


def keys(d, name):
    return security.Keys(d, name)


@pytest.fixture(scope="module")
def blockmgr(keys_dir):
    """A block manager with keys, in a thread; yields (address, manager)."""
    import blockmgr.server as server_mod

    manager = BlockManager(watermark=0)
    addr = f"tcp://127.0.0.1:{_free_port()}"
    original, server_mod.signal.signal = server_mod.signal.signal, lambda *a: None  # main thread only
    try:
        threading.Thread(target=server_mod.serve, args=(addr, manager, None, keys(keys_dir, "blockmgr"), LIMIT),
                         daemon=True).start()
        BlockManagerClient(addr, 5, keys(keys_dir, "gateway")).ping()
    finally:
        server_mod.signal.signal = original
    return addr, manager


def raw_dealer(keys_obj=None, server="blockmgr"):
    sock = security.limit(zmq.Context.instance().socket(zmq.DEALER))
    # A socket whose handshake the server refused has no peer, and a send would wait for one
    # forever: bounded, so that such a test fails (or, where refusal is the point, passes) in time.
    sock.setsockopt(zmq.SNDTIMEO, 2000)
    if keys_obj is not None:
        keys_obj.connect(sock, server)
    return sock


# -- keys -------------------------------------------------------------------------------------

def test_keys_are_private_and_created_once(tmp_path):
    d = tmp_path / "k"
    out = subprocess.run([sys.executable, "-c", "from gateway.cli import main; main()", "keys", "--keys-dir", str(d),
                          "--name", "blockmgr", "--name", "gateway"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "created blockmgr, gateway" in out.stdout
    assert d.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in d.glob("*.key_secret")} == {
        "blockmgr.key_secret": 0o600, "gateway.key_secret": 0o600}
    before = (d / "gateway.key_secret").read_bytes()
    assert security.create_keys(d, ["gateway", "executor-0"]) == ["executor-0"]
    assert (d / "gateway.key_secret").read_bytes() == before, "an existing key is never replaced"
    k = security.Keys(d, "gateway")
    assert set(k.trusted.values()) == {"blockmgr", "gateway", "executor-0"}
    os.chmod(d, 0o755)
    with pytest.raises(security.KeysError, match="group or others"):
        security.Keys(d, "gateway")
    with pytest.raises(ValueError, match="invalid principal"):
        security.create_keys(d, ["../etc"])


def _run(module, *argv, env=None):
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PAGEDSERVE_KEYS_DIR": "", **(env or {})})


def test_services_refuse_to_start_without_keys_or_on_a_public_address_insecurely(tmp_path):
    port = _free_port()
    no_keys = _run("blockmgr", "--bind", f"tcp://127.0.0.1:{port}")
    assert no_keys.returncode == 2 and "no CURVE keys" in no_keys.stderr
    public = _run("blockmgr", "--insecure-local", "--bind", f"tcp://0.0.0.0:{port}")
    assert public.returncode == 2 and "loopback addresses only" in public.stderr
    events = _run("blockmgr", "--insecure-local", "--kv-events-bind", f"tcp://0.0.0.0:{port}")
    assert events.returncode == 2 and "loopback addresses only" in events.stderr
    executor = _run("executor", "--insecure-local", "--bind", f"tcp://0.0.0.0:{port}")
    assert executor.returncode == 2 and "loopback addresses only" in executor.stderr
    missing = _run("blockmgr", "--keys-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    from blockmgr.server import serve

    with pytest.raises(ValueError, match="without authentication"):
        serve(f"tcp://0.0.0.0:{port}")


def test_gateway_needs_the_executor_id_to_know_its_key(keys_dir):
    from executor.client import ExecutorClient

    with pytest.raises(ValueError, match="EXECUTOR_ID@"):
        ExecutorClient("tcp://127.0.0.1:5560", keys=keys(keys_dir, "gateway"))
    client = ExecutorClient("executor-0@tcp://127.0.0.1:5560", keys=keys(keys_dir, "gateway"))
    assert (client.server_name, client.address) == ("executor-0", "tcp://127.0.0.1:5560")


# -- block manager ----------------------------------------------------------------------------

def test_unauthenticated_or_unknown_peers_get_nothing(blockmgr, keys_dir, stranger):
    addr, manager = blockmgr
    plain = raw_dealer()
    plain.connect(addr)
    with contextlib.suppress(zmq.Again):  # a send refused for want of a peer is no answer either
        plain.send_multipart([b"", protocol.encode({"op": "register", "executor_id": "executor-0",
                                                    "num_device_blocks": 1, "block_size": 1})])
    assert not plain.poll(1000), "a peer without CURVE gets no answer"
    plain.close()
    for name in ("gateway", "impostor"):
        impostor = BlockManagerClient(addr, timeout_s=1, keys=keys(stranger, name))
        with pytest.raises(BlockManagerUnavailable):
            impostor.register("executor-0", 1, 1)
        impostor.close()
    assert "executor-0" not in manager.executors or manager.executors["executor-0"].device.num_blocks != 1


def test_a_send_that_cannot_leave_raises_within_the_deadline():
    """A client's send has the reply's deadline (SNDTIMEO): a DEALER without a live pipe blocks in
    send, which once hung a caller whose CURVE handshake had been refused."""
    client = BlockManagerClient(f"tcp://127.0.0.1:{_free_port()}", timeout_s=0.3)
    sock = client._connect()
    assert sock.getsockopt(zmq.SNDTIMEO) == 300
    sock.close()

    class Stuck:  # a socket whose send times out, as a mute DEALER's does
        def send_multipart(self, frames):
            raise zmq.Again()

        def close(self):
            self.closed = True

    client._sock = stuck = Stuck()
    with pytest.raises(BlockManagerUnavailable, match="did not take 'register' within 0.3s"):
        client.register("executor-0", 1, 1)
    assert stuck.closed and client._sock is None  # the next call starts on a fresh socket
    client.close()


def test_an_executor_acts_only_on_its_own_sequences(blockmgr, keys_dir):
    addr, manager = blockmgr
    ex0 = BlockManagerClient(addr, 5, keys(keys_dir, "executor-0"))
    ex1 = BlockManagerClient(addr, 5, keys(keys_dir, "executor-1"))
    gw = BlockManagerClient(addr, 5, keys(keys_dir, "gateway"))
    ex0.register("executor-0", 16, 4)
    ex0.step("executor-0", admit=[("victim", list(range(9)), 9, None, 0)])
    table = manager.executors["executor-0"].seqs["victim"].block_table[:]
    attacks = [
        lambda: ex1.register("executor-0", 4, 4),  # would wipe executor-0's state
        lambda: ex1.step("executor-0", free=["victim"]),  # its blocks would be handed out again
        lambda: ex1.step("executor-0", grow=[("victim", 10, [5])]),
        lambda: ex1.sequence("executor-0", "victim"),
        lambda: ex1.match_prefix(list(range(9))),  # probing another tenant's prompts
        lambda: ex1.stats(),
        lambda: ex1.reset_prefix_cache(),
        lambda: ex1.reset_prefix_cache("executor-0"),
    ]
    for attack in attacks:
        with pytest.raises(BlockManagerRequestError, match="forbidden"):
            attack()
    seq = manager.executors["executor-0"].seqs["victim"]
    assert seq.block_table == table and seq.num_tokens == 9
    check_books(manager.executors["executor-0"])
    # Its own state and the gateway's operations still work.
    assert ex1.register("executor-1", 8, 4)["resumed"] is False
    assert gw.match_prefix(list(range(9)))["executor-0"] == 0
    assert gw.sequence("executor-0", "victim")["num_tokens"] == 9
    ex0.step("executor-0", free=["victim"])
    for c in (ex0, ex1, gw):
        c.close()


def test_malformed_fields_get_an_error_naming_them(blockmgr, keys_dir):
    addr, _ = blockmgr
    ex0 = BlockManagerClient(addr, 5, keys(keys_dir, "executor-0"))
    ex0.register("executor-0", 16, 4)
    for message, field in [
        ({"op": "register", "executor_id": "executor-0", "num_device_blocks": 2.5, "block_size": 4}, "num_device_blocks"),
        ({"op": "register", "executor_id": "executor-0", "num_device_blocks": 2**40, "block_size": 4}, "num_device_blocks"),
        ({"op": "register", "executor_id": "executor-0", "num_device_blocks": 4, "block_size": 4,
          "cost": {"copy_bandwidth": float("nan")}}, "cost.copy_bandwidth"),
        ({"op": "step", "executor_id": "executor-0", "admit": [["a", [-1], 1, None, 0]]}, "admit.0.1.0"),
        ({"op": "step", "executor_id": "executor-0", "free": [True]}, "free.0"),
        ({"op": "step", "executor_id": "executor-0", "evil": 1}, "evil"),
        ({"op": "match_prefix", "token_ids": "abc"}, "token_ids"),
    ]:
        with pytest.raises(BlockManagerRequestError, match=f"malformed field: {field}"):
            ex0._checked(message)
    ex0.close()


def test_oversize_messages_are_dropped_unread(blockmgr, keys_dir):
    addr, manager = blockmgr
    sock = raw_dealer(keys(keys_dir, "executor-0"))
    sock.connect(addr)
    huge = {"op": "step", "executor_id": "executor-0", "free": ["x" * 200] * (LIMIT // 200 + 10)}
    assert len(protocol.encode(huge)) > LIMIT
    sock.send_multipart([b"", protocol.encode(huge)])
    assert not sock.poll(1000), "the oversize message is dropped with its connection"
    sock.close()
    BlockManagerClient(addr, 5, keys(keys_dir, "gateway")).ping()


def test_kv_events_reach_only_subscribers_with_a_trusted_key(keys_dir, stranger):
    from blockmgr.server import KVEventPublisher

    events_addr = f"tcp://127.0.0.1:{_free_port()}"
    publisher = KVEventPublisher(events_addr, keys(keys_dir, "blockmgr"))
    manager = BlockManager(on_events=publisher)
    subs = {}
    for who, k in (("plain", None), ("stranger", keys(stranger, "gateway")), ("gateway", keys(keys_dir, "gateway"))):
        sub = security.limit(zmq.Context.instance().socket(zmq.SUB))
        if k is not None:
            k.connect(sub, "blockmgr")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(events_addr)
        subs[who] = sub
    try:
        time.sleep(0.5)  # let subscriptions reach the publisher
        manager.register("ex", 4, 4)
        manager.step("ex", admit=[("a", list(range(9)), 9, None, 0)])
        manager.step("ex", free=["a"])
        assert subs["gateway"].poll(3000)
        _, events = msgpack.unpackb(subs["gateway"].recv(), raw=False)
        assert events[0][0] == "BlockStored" and events[0][4] == list(range(8))
        assert not subs["plain"].poll(300) and not subs["stranger"].poll(300), "token ids leak to no one else"
    finally:
        for sub in subs.values():
            sub.close()
        publisher.sock.close()


# -- fuzzing the block manager ----------------------------------------------------------------

def weird():
    """Values of every msgpack type, including the edge cases of each."""
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                       st.text(max_size=20), st.binary(max_size=20), st.sampled_from(["a", "b", "c", "executor-0"]))
    return st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)


def valid_blockmgr_messages():
    ids = st.sampled_from(["a", "b", "c"])
    prompt = st.lists(st.integers(0, 50), min_size=1, max_size=12)
    return st.one_of(
        st.builds(lambda n, c: {"op": "register", "executor_id": "executor-0", "num_device_blocks": n,
                                "block_size": 4, "num_cpu_blocks": c,
                                "cost": {"bytes_per_block": 1, "copy_bandwidth": 1e9, "flops_per_token": 1e9,
                                         "flops_per_s": 1e9}}, st.sampled_from([12, 12, 12, 5]),
                  st.sampled_from([4, 4, 4, 0])),
        st.builds(lambda a, f, fk, g, s: {"op": "step", "executor_id": "executor-0", "admit": a, "free": f,
                                          "fork": fk, "grow": g, "swap_in": s},
                  st.lists(st.tuples(ids, prompt, st.integers(1, 12), st.none() | st.just("salt"),
                                     st.integers(-2, 2)).map(list), max_size=2),
                  st.lists(ids, max_size=2), st.lists(st.tuples(ids, ids).map(list), max_size=1),
                  st.lists(st.tuples(ids, st.integers(1, 40), st.lists(st.integers(0, 50), max_size=3)).map(list),
                           max_size=2),
                  st.lists(ids, max_size=1)),
        st.builds(lambda t: {"op": "match_prefix", "token_ids": t, "cache_salt": None}, prompt),
        st.builds(lambda s: {"op": "sequence", "executor_id": "executor-0", "seq_id": s}, ids),
        st.just({"op": "reset_prefix_cache", "executor_id": "executor-0"}),
        st.just({"op": "stats"}),
    )


@st.composite
def mutated(draw, valid):
    """A valid message with one field (at any depth) replaced, dropped, or added."""
    message = copy.deepcopy(draw(valid))

    def paths(value, prefix=()):
        yield prefix
        if isinstance(value, dict):
            for k, v in value.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from paths(v, prefix + (i,))

    path = draw(st.sampled_from([p for p in paths(message) if p]))
    parent = message
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace" or (action == "drop" and isinstance(parent, list)):
        parent[path[-1]] = draw(weird())
    elif action == "drop":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(weird())
    else:
        parent.append(draw(weird()))
    return message


def frames():
    return st.one_of(
        valid_blockmgr_messages().map(protocol.encode),
        mutated(valid_blockmgr_messages()).map(protocol.encode),
        st.dictionaries(st.text(max_size=10), weird(), max_size=5).map(protocol.encode),
        weird().map(protocol.encode),
        st.binary(max_size=64),
    )


def test_fuzzed_block_manager_answers_and_keeps_its_books(blockmgr, keys_dir):
    addr, manager = blockmgr
    legit = BlockManagerClient(addr, 5, keys(keys_dir, "executor-0"))
    cost = {"bytes_per_block": 1, "copy_bandwidth": 1e9, "flops_per_token": 1e9, "flops_per_s": 1e9}
    legit.register("executor-0", 12, 4, 4, cost)
    sock = raw_dealer(keys(keys_dir, "executor-0"))
    sock.connect(addr)

    def legit_step():
        """The executor's own traffic: admit a sequence (sharing a prefix), grow the running ones, free old ones."""
        ex = manager.executors.get("executor-0")
        if ex is None:
            return
        seqs = list(ex.seqs.values())
        free = [s.seq_id for s in seqs[:-5]]
        grow = [(s.seq_id, s.num_tokens + 1, [7]) for s in seqs[-5:] if not s.swapped and s.block_table]
        swap_in = [s.seq_id for s in seqs[-5:] if s.swapped][:1]
        # The fuzzer's messages name sequences a, b, c: keep some of them alive for it to hit.
        new = next((x for x in ("a", "b", "c", "d", "e") if x not in ex.seqs and x not in free), None)
        try:
            legit.step("executor-0", free=free, grow=grow, swap_in=swap_in,
                       admit=[(new, [1, 2, 3, 4, 5, 6], 6, None, 0)] if new else [])
        except BlockManagerRequestError:
            pass

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(frames(), min_size=1, max_size=4))
    def run(batch):
        for frame in batch:
            legit_step()
            sock.send_multipart([b"", frame])
            assert sock.poll(5000), "every message gets a reply"
            reply = protocol.decode(sock.recv_multipart()[-1])
            assert isinstance(reply["ok"], bool) and (reply["ok"] or isinstance(reply["error"], str))
        for ex in list(manager.executors.values()):
            check_books(ex)
            if ex.device.num_blocks + ex.cpu.num_blocks > 4096:
                # A valid but huge pool (up to 2^22 blocks) makes every later check slow: start over.
                manager.register(ex.executor_id, 12, 4, 4)

    try:
        run()
    finally:
        sock.close()
        legit.close()


# -- the executor -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def executor(keys_dir, tmp_path_factory):
    """A tiny random-weight model's executor with keys, in a thread; yields (address, block manager, server)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from executor.engine import Engine, EngineConfig
    from executor.model_loader import load_model
    from executor.server import ExecutorServer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=512, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    d = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    bm = InProcessBlockManager(BlockManager())
    engine = Engine(load_model(d, progress=False), bm, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=8),
                    {2}, executor_id="executor-0", device="cpu", dtype=torch.float32)
    addr = f"tcp://127.0.0.1:{_free_port()}"
    server = ExecutorServer(engine, addr, {"executor_id": "executor-0"}, keys(keys_dir, "executor-0"), LIMIT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield addr, bm, server
    server.stopping = True
    thread.join(10)


class Peer:
    """A gateway-side DEALER with some principal's keys."""

    def __init__(self, addr, keys_obj):
        self.sock = raw_dealer(keys_obj, "executor-0")
        self.sock.connect(addr)

    def send(self, message):
        self.sock.send(message if isinstance(message, bytes) else protocol.encode(message))

    def recv(self, timeout_ms=10_000):
        assert self.sock.poll(timeout_ms), "no answer"
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def until(self, pred, timeout_ms=20_000):
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            msg = self.recv(max(1, int((deadline - time.monotonic()) * 1000)))
            if pred(msg):
                return msg
        raise AssertionError("no matching message")

    def close(self):
        self.sock.close()


def generate(rid, **params):
    return {"op": "generate", "request_id": rid, "prompt_token_ids": [5, 6, 7],
            "params": {"max_tokens": 3, "temperature": 0, **params}, "priority": 0, "cache_salt": None}


def test_float_logprobs_is_refused_and_the_executor_keeps_serving(executor, keys_dir):
    addr, _, _ = executor
    gw = Peer(addr, keys(keys_dir, "gateway"))
    gw.send(generate("bad", logprobs=2.5))
    out = gw.until(lambda m: m.get("request_id") == "bad")
    assert out["finish_reason"] == "error" and "logprobs" in out["error"]
    gw.send(generate("good", logprobs=2))
    out = gw.until(lambda m: m.get("request_id") == "good" and m.get("finished"))
    assert out["finish_reason"] == "length"
    gw.close()


def test_only_the_gateway_drives_an_executor(executor, keys_dir, stranger):
    addr, _, server = executor
    plain = Peer(addr, None)
    with contextlib.suppress(zmq.Again):  # a send refused for want of a peer is no answer either
        plain.send({"op": "ping", "nonce": 1})
    assert not plain.sock.poll(1000), "no answer without CURVE"
    plain.close()
    impostor = Peer(addr, keys(stranger, "gateway"))
    impostor.send(generate("x"))
    assert not impostor.sock.poll(1000), "no answer to an unknown key"
    impostor.close()
    other = Peer(addr, keys(keys_dir, "executor-1"))
    other.send({"op": "ping", "nonce": 7})
    assert other.recv() == {"op": "reply", "nonce": 7}
    other.send(generate("y"))
    assert "forbidden" in other.recv()["error"]
    other.close()
    # One gateway-side client cannot abort what another submitted. The abort must reach the
    # executor while the request is still in flight (an abort of a finished request is ignored
    # silently): this tiny model decodes a token in well under a millisecond, so a test process
    # descheduled for a moment can miss it; then the request is seen finished and tried again.
    gw, bm_key = Peer(addr, keys(keys_dir, "gateway")), Peer(addr, keys(keys_dir, "blockmgr"))
    refused = False
    for attempt in range(5):
        rid = f"mine-{attempt}"
        gw.send(generate(rid, max_tokens=250, ignore_eos=True))
        gw.until(lambda m: m.get("request_id") == rid)
        bm_key.send({"op": "abort", "request_id": rid})
        if bm_key.sock.poll(2_000):
            assert "belongs to another client" in bm_key.recv()["error"]
            refused = True
        out = gw.until(lambda m: m.get("request_id") == rid and m.get("finished"))
        assert out["finish_reason"] == "length"  # the refused abort did not stop it
        if refused:
            break
    assert refused, "the executor never refused another client's abort"
    gw.close()
    bm_key.close()


def executor_messages():
    rids = st.sampled_from(["r0", "r1", "r2"])
    params = st.fixed_dictionaries({"max_tokens": st.integers(1, 4)}, optional={
        "temperature": st.floats(0, 2), "n": st.integers(1, 3), "logprobs": st.integers(0, 3),
        "top_k": st.integers(-1, 5), "seed": st.integers(0, 2**32), "use_beam_search": st.booleans(),
        "prompt_logprobs": st.integers(0, 2), "min_tokens": st.integers(0, 1)})
    valid = st.one_of(
        st.builds(lambda r, p, pr, prio: {"op": "generate", "request_id": r, "prompt_token_ids": pr, "params": p,
                                          "priority": prio, "cache_salt": None},
                  rids, params, st.lists(st.integers(0, 511), min_size=1, max_size=10), st.integers(-3, 3)),
        st.builds(lambda r: {"op": "abort", "request_id": r}, rids),
        st.builds(lambda op, n: {"op": op, "nonce": n}, st.sampled_from(["info", "ping", "sequences"]),
                  st.integers(0, 100)),
    )
    return st.one_of(valid, mutated(valid), st.dictionaries(st.text(max_size=10), weird(), max_size=5),
                     st.binary(max_size=32))


def test_fuzzed_executor_answers_and_frees_every_block(executor, keys_dir):
    addr, bm, server = executor
    gw = Peer(addr, keys(keys_dir, "gateway"))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(executor_messages(), min_size=1, max_size=4))
    def run(batch):
        for message in batch:
            gw.send(message)
        for rid in ("r0", "r1", "r2"):
            gw.send({"op": "abort", "request_id": rid})
        # Still answering; once idle, every block is back and the books balance.
        deadline = time.monotonic() + 20
        while True:
            gw.send({"op": "info", "nonce": -1})
            info = gw.until(lambda m: m.get("op") == "reply" and m.get("nonce") == -1)
            if info["num_running"] + info["num_waiting"] + info["num_swapped"] == 0:
                break
            assert time.monotonic() < deadline, info
        while server.engine.has_work():  # the step that frees aborted blocks runs right after the abort
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.01)
        ex = bm.manager.executors["executor-0"]
        check_books(ex)
        assert ex.device.num_used == 0, "no block leaked"
        while gw.sock.poll(0):
            gw.sock.recv()

    try:
        run()
    finally:
        gw.close()


def test_gateway_client_talks_curve_and_surfaces_refusals(executor, keys_dir):
    import asyncio

    from executor.client import ExecutorClient, ExecutorUnavailable

    addr, _, _ = executor

    async def main():
        client = ExecutorClient(f"executor-0@{addr}", keys=keys(keys_dir, "gateway"))
        await client.start()
        try:
            assert (await client.request("info", timeout_s=10))["executor_id"] == "executor-0"
            with pytest.raises(ExecutorUnavailable, match="refused: unknown op 'frobnicate'"):
                await client.request("frobnicate", timeout_s=10)
            outs = [m async for m in client.generate("c1", [5, 6], {"max_tokens": 2, "temperature": 0})]
            assert outs[-1]["finished"] and sum(len(m["token_ids"]) for m in outs) == 2
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_removed_key_is_refused_and_an_added_one_accepted_without_a_restart(tmp_path, caplog):
    """Revoking a key is deleting its ``.key`` file: the next handshake with it is refused; a key
    added later is accepted; both are logged. No restart of the service."""
    import blockmgr.server as server_mod

    d = tmp_path / "keys"
    security.create_keys(d, ["blockmgr", "gateway", "executor-0", "executor-1"])
    addr = f"tcp://127.0.0.1:{_free_port()}"
    original, server_mod.signal.signal = server_mod.signal.signal, lambda *a: None  # main thread only
    try:
        threading.Thread(target=server_mod.serve, args=(addr, BlockManager(watermark=0), None, keys(d, "blockmgr"),
                                                        LIMIT), daemon=True).start()
        BlockManagerClient(addr, 5, keys(d, "gateway")).ping()
    finally:
        server_mod.signal.signal = original

    def can_ping(name: str, timeout_s: float = 2) -> bool:
        client = BlockManagerClient(addr, timeout_s=timeout_s, keys=keys(d, name))
        try:
            client.ping()
            return True
        except BlockManagerUnavailable:
            return False
        finally:
            client.close()

    assert can_ping("executor-1")
    executor_1 = keys(d, "executor-1")  # its holder keeps the key pair after we revoke it
    gateway = keys(d, "gateway")
    (d / "executor-1.key").unlink()
    with caplog.at_level(logging.WARNING, logger="pagedserve.security"):
        client = BlockManagerClient(addr, timeout_s=1, keys=executor_1)
        with pytest.raises(BlockManagerUnavailable):
            client.ping()
        client.close()
        assert can_ping("executor-0")
        security.create_keys(d, ["executor-2"])
        assert can_ping("executor-2", timeout_s=5)
        # A half-copied key file is not trusted, and the handler that read it keeps answering.
        (d / "stranger.key").write_text('metadata\ncurve\n    public-key = "abc"\n')
        assert can_ping("executor-0", timeout_s=5)
        # Running the revoked name again gives it a new pair; the old one stays refused.
        assert security.create_keys(d, ["executor-1"]) == ["executor-1"]
        assert can_ping("executor-1", timeout_s=5)
        client = BlockManagerClient(addr, timeout_s=1, keys=executor_1)
        with pytest.raises(BlockManagerUnavailable):
            client.ping()
        client.close()
    changes = [r.getMessage() for r in caplog.records if "changed" in r.getMessage()]
    assert any("no longer trusting executor-1" in m for m in changes), changes
    assert any("now trusting executor-2" in m for m in changes), changes
    assert any(r.getMessage().startswith(f"not trusting {d / 'stranger.key'}") for r in caplog.records)
    # What a process connects with stays as loaded at its start, whatever its handler re-reads.
    assert gateway.public_key("executor-1") == executor_1.public
