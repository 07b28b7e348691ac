"""The real stack as OS processes: `pagedserve serve` -> block manager, two executors, gateway.

Asked through the official `openai` client, the way a user would. One stack serves the whole
module (it takes ~25 s to start on 2 cores); a test that kills it leaves the next test a new one.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests import procfs

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _start_stack(smollm_dir, log_path: Path) -> dict:
    from tests.conftest import _free_port, _free_ports

    port = _free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from gateway.cli import main; main()", "serve", "--port", str(port),
         "--blockmgr-port", str(_free_port()), "--executor-base-port", str(_free_ports(2)),
         "--num-blocks", "256", "--device", "cpu", "--num-executors", "2", "--max-model-len", "512"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:  # until both executors answer: /health is 200 from the first one on
        try:
            health = httpx.get(f"{base}/health", timeout=2)
            if health.status_code == 200 and health.json()["executors"] == 2:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            raise AssertionError(f"stack did not become healthy:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    return {"proc": proc, "base": base, "log": log_path, "log_file": log}


def _stop_stack(st: dict) -> None:
    if st["proc"].poll() is None:
        st["proc"].send_signal(signal.SIGTERM)
        st["proc"].wait(30)
    st["log_file"].close()


@pytest.fixture(scope="module")
def _stacks():
    started: list[dict] = []
    yield started
    for st in started:
        if "proc" in st:
            _stop_stack(st)


@pytest.fixture
def stack(smollm_dir, tmp_path_factory, _stacks):
    """The module's live stack; started again if a test before this one killed it (any order).

    A stack that fails to start fails every later test at once instead of being retried by each.
    """
    if _stacks and "failed" in _stacks[-1]:
        pytest.fail(_stacks[-1]["failed"])
    if not _stacks or _stacks[-1]["proc"].poll() is not None:
        try:
            _stacks.append(_start_stack(smollm_dir, tmp_path_factory.mktemp("stack") / "serve.log"))
        except AssertionError as exc:
            _stacks.append({"failed": str(exc)})
            raise
    return _stacks[-1]


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_three_service_processes(stack):
    names = sorted(procfs.cmdline(pid).split(" -m ")[1].split()[0] for pid in procfs.children(stack["proc"].pid))
    assert names == ["blockmgr", "executor", "executor", "gateway"]
    # Settings travel in the environment, not on the command line (where `ps` would show keys).
    assert all(procfs.cmdline(pid).split()[-2] == "-m" for pid in procfs.children(stack["proc"].pid))
    # No --num-threads: the usable cores are split between the two executors, and serve says so.
    cores = len(os.sched_getaffinity(0))
    per = max(1, cores // 2)
    for i in range(2):
        log = stack["log"].read_text()
        assert f"executor-{i}: {per} torch threads ({cores} usable cores, 2 executors)" in log
        # ...and the executor's own line gives serve's reason, not a flag nobody passed.
        assert (f"[executor-{i}]: {per} torch threads (chosen by pagedserve serve: {cores} usable cores, "
                "2 executors)") in log
        # Every line of an executor names it, its loader's too.
        assert f"[executor-{i}]: KV cache: " in log
        loaded = [line for line in log.splitlines() if " loaded " in line and " layers, " in line]
        assert all(" [executor-" in line for line in loaded), loaded  # restarted executors' lines too
        assert any(f" [executor-{i}]: loaded " in line for line in loaded), loaded
        ex = next(pid for pid in procfs.children(stack["proc"].pid)
                  if procfs.environ(pid).get("PAGEDSERVE_EXECUTOR_ID") == f"executor-{i}")
        assert procfs.environ(ex)["PAGEDSERVE_NUM_THREADS"] == str(per)


def test_the_stack_is_authenticated_by_default(stack):
    import zmq

    from blockmgr import protocol

    children = [(procfs.cmdline(pid).split()[-1], procfs.environ(pid)) for pid in procfs.children(stack["proc"].pid)]
    assert all(env.get("PAGEDSERVE_KEYS_DIR") and env.get("PAGEDSERVE_INSECURE_LOCAL") == "false"
               for _, env in children)
    bind_var = {"blockmgr": "PAGEDSERVE_BLOCKMGR_BIND", "executor": "PAGEDSERVE_EXECUTOR_BIND"}
    for module, env in children:
        if module == "gateway":
            continue  # it binds no ZeroMQ socket
        bind = env[bind_var[module]]
        plain = zmq.Context.instance().socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        # Once the server has refused the handshake the socket has no peer, and a send would wait
        # for one forever: a send that times out is a refusal too.
        plain.setsockopt(zmq.SNDTIMEO, 1000)
        plain.connect(bind)
        try:
            plain.send_multipart([b"", protocol.encode({"op": "ping", "nonce": 1})])
        except zmq.Again:
            pass
        assert not plain.poll(1000), f"{bind} answered a peer without a key"
        plain.close()


def test_chat_answers_paris_streamed_and_not(client, stack):
    model = client.models.list().data[0].id
    full = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    assert "Paris" in text
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=40,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason

    # Every request has finished: the block manager holds no block for anyone.
    deadline = time.monotonic() + 5
    while True:
        cache = httpx.get(stack["base"] + "/admin/cache").json()["executors"]
        used = sum(ex["device"]["used"] for ex in cache.values())
        if used == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert used == 0, cache


def test_completions_and_sse_done(client, stack):
    c = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    assert "Paris" in c.choices[0].text
    with httpx.stream("POST", stack["base"] + "/v1/completions", timeout=60,
                      json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
                            "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "", "max_tokens": 4}, "prompt"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
])
def test_bad_completion_requests_get_400(stack, body, param):
    r = httpx.post(stack["base"] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param


def test_an_unknown_model_is_not_found_for_the_openai_client(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=1)
    assert exc.value.status_code == 404 and exc.value.code == "model_not_found"


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": QUESTION, "max_tokens": 0},
    {"messages": QUESTION, "max_tokens": -3},
    {"messages": QUESTION, "max_tokens": 100000},
    {"messages": "not a list"},
])
def test_bad_chat_requests_get_400_and_server_keeps_serving(stack, client, body):
    r = httpx.post(stack["base"] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[], max_tokens=1)
    ok = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


# ------------------------------------------------------------------ the API in full, on the real model
MODEL = "SmolLM2-135M-Instruct"


def _used_blocks(base) -> int:
    return sum(ex["device"]["used"] for ex in httpx.get(base + "/admin/cache").json()["executors"].values())


def test_completion_prompt_forms_n_seed_and_stop_token_ids(client):
    ids = client.post("/../tokenize", cast_to=object, body={"prompt": "The capital of France is"})["tokens"]
    for prompt in ("The capital of France is", ["The capital of France is", "One, two, three,"], ids, [ids, ids]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, user="tester")
        n_prompts = 2 if isinstance(prompt[0], (str, list)) and not isinstance(prompt, str) else 1
        assert len(r.choices) == n_prompts and r.choices[0].text
    assert "Paris" in r.choices[0].text
    a = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, n=2, seed=11,
                                  temperature=0.9, top_p=0.95, extra_body={"top_k": 40})
    b = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, n=2, seed=11,
                                  temperature=0.9, top_p=0.95, extra_body={"top_k": 40})
    assert [c.index for c in a.choices] == [0, 1] and [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 16
    # stop_token_ids / ignore_eos: stopping on the token the greedy answer starts with gives (almost) nothing.
    first = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0)
    first_id = client.post("/../tokenize", cast_to=object, body={"prompt": first.choices[0].text})["tokens"][0]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [first_id], "ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1


def test_chat_parameters(client):
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_completion_tokens=12, n=2,
        messages=[{"role": "system", "content": "You answer briefly."},
                  {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                               {"type": "text", "text": "of France?"}]},
                  {"role": "assistant", "content": "Paris."},
                  {"role": "user", "content": "And of Italy?"}],
        extra_body={"cache_salt": "tenant-1", "priority": 1})
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    assert r.usage.completion_tokens <= 24


@pytest.mark.parametrize("extra", [
    {"presence_penalty": 0.5, "frequency_penalty": 0.5},
    {"extra_body": {"min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 3}},
    {"logprobs": True, "top_logprobs": 2},
])
def test_sampling_extras_on_chat(client, extra):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, **extra)
    assert r.choices[0].message.content
    if extra.get("logprobs"):
        assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens


def test_echo_logprobs_for_lm_eval(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is Paris", max_tokens=0, echo=True,
                                  logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "The capital of France is Paris" and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    streamed = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, logprobs=2, echo=True,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices).startswith("Hello there")


def test_use_beam_search(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                  extra_body={"use_beam_search": True, "beam_width": 2})
    assert r.choices[0].text


def test_stop_string_spanning_tokens_streamed_equals_non_streamed(client):
    kw = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    text = client.chat.completions.create(**kw).choices[0].message.content
    stop = "of France"  # several tokens, in the middle of what the model is about to say
    assert stop in text and len(client.post("/../tokenize", cast_to=object, body={"prompt": stop})["tokens"]) > 1
    full = client.chat.completions.create(stop=[stop], **kw).choices[0]
    assert full.message.content == text[:text.index(stop)] and full.finish_reason == "stop"
    chunks = list(client.chat.completions.create(stop=[stop], stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.message.content
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10, temperature=0,
                                  stop=" Paris")
    assert "Paris" not in c.choices[0].text


def test_cjk_streamed_has_no_replacement_char_and_equals_non_streamed(client):
    kw = dict(model=MODEL, prompt="Chinese: 你好世界。Japanese: こんにちは。Chinese:", max_tokens=12, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert any(ord(ch) > 0x2E80 for ch in full), full  # the model does answer in CJK
    deltas = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(deltas) == full
    assert not any("\ufffd" in d for d in deltas)


def test_shared_long_prefix_lands_on_the_same_executor_and_is_cached(client, stack):
    base = stack["base"]
    before = httpx.get(base + "/admin/cache").json()["executors"]
    prefix = "The history of the city of Paris begins in prehistoric times, on an island in the Seine. " * 4
    client.completions.create(model=MODEL, prompt=prefix + "First question:", max_tokens=2, temperature=0)
    mid = httpx.get(base + "/admin/cache").json()["executors"]
    r = client.completions.create(model=MODEL, prompt=prefix + "Second question:", max_tokens=2, temperature=0)
    after = httpx.get(base + "/admin/cache").json()["executors"]
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    queried = [e for e in after if after[e]["prefix_cache"]["queries_tokens"] > mid[e]["prefix_cache"]["queries_tokens"]]
    first = [e for e in after if mid[e]["prefix_cache"]["queries_tokens"] > before[e]["prefix_cache"]["queries_tokens"]]
    assert queried == first and len(queried) == 1  # the same executor served both
    assert after[queried[0]]["prefix_cache"]["hits_tokens"] > mid[queried[0]]["prefix_cache"]["hits_tokens"]


def test_disconnect_mid_stream_frees_blocks_within_a_second(stack):
    base = stack["base"]
    body = {"model": MODEL, "prompt": "Write a very long story about a dragon.", "max_tokens": 300, "n": 2,
            "stream": True, "ignore_eos": True, "temperature": 0.8}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert _used_blocks(base) > 0
        seqs = httpx.get(base + "/admin/sequences").json()["sequences"]
        assert seqs and {s["state"] for s in seqs} <= {"running", "waiting", "swapped"}
        detail = httpx.get(base + f"/admin/sequences/{seqs[0]['request_id']}")
        assert detail.status_code == 200 and detail.json()["sequences"][0]["blocks"]
    t0 = time.monotonic()
    while _used_blocks(base) != 0:
        assert time.monotonic() - t0 < 1.0, httpx.get(base + "/admin/cache").json()
        time.sleep(0.02)


def test_admin_executors_metrics_and_reset(stack):
    base = stack["base"]
    exs = httpx.get(base + "/admin/executors").json()["executors"]
    assert sorted(e["executor_id"] for e in exs) == ["executor-0", "executor-1"]
    assert all(e["healthy"] and e["num_blocks"] == 256 and e["device"] == "cpu" for e in exs)
    assert all(e["async_scheduling"] is True for e in exs), "pipelined scheduling is the default"
    text = httpx.get(base + "/metrics").text
    for name in ("pagedserve:kv_cache_usage_perc", "pagedserve:prefix_cache_queries_total",
                 "pagedserve:prefix_cache_hits_total", "pagedserve:num_preemptions_total",
                 "pagedserve:num_requests_running", "pagedserve:num_requests_waiting",
                 "pagedserve:num_requests_swapped", "pagedserve:prompt_tokens_total",
                 "pagedserve:generation_tokens_total", "pagedserve:time_to_first_token_seconds_bucket",
                 "pagedserve:inter_token_latency_seconds_bucket", "pagedserve:e2e_request_latency_seconds_bucket"):
        assert name in text, name
    r = httpx.post(base + "/admin/cache/reset")
    assert r.status_code == 200 and r.json()["reset"] is True
    cache = httpx.get(base + "/admin/cache").json()["executors"]
    assert all(e["device"]["cached_free"] == 0 for e in cache.values())


def test_small_fuzz_round_against_the_real_stack(stack):
    """A short schemathesis round (schema-breaking inputs) on the real stack: no 500, no crash."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(stack["base"] + "/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.NEGATIVE])
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        strategy = schema[path]["POST"].as_strategy(generation_mode=GenerationMode.NEGATIVE)

        @given(case=strategy)
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case):
            if isinstance(case.body, dict):
                # A "negative" case can still be valid; keep its generation short on the CPU (a
                # streamed beam search says nothing until it ends, so a long one outlasts the timeout).
                for key in ("max_tokens", "max_completion_tokens"):
                    if isinstance(case.body.get(key), int) and not isinstance(case.body[key], bool):
                        case.body[key] = min(case.body[key], 4)
                if not {"max_tokens", "max_completion_tokens"} & set(case.body):
                    case.body["max_tokens"] = 4
            response = case.call(base_url=stack["base"], timeout=60)
            case.validate_response(response, checks=[not_a_server_error])

        run()
    assert stack["proc"].poll() is None
    assert httpx.get(stack["base"] + "/health").status_code == 200


def test_serve_restarts_a_dead_executor_and_serves_on(stack):
    """Kills an executor child; serve restarts it (a new incarnation) and the stack serves on."""
    proc = stack["proc"]

    def executor_0():
        return [p for p in procfs.children(proc.pid) if " -m executor" in procfs.cmdline(p)
                and procfs.environ(p).get("PAGEDSERVE_EXECUTOR_ID") == "executor-0"
                and procfs.alive(p)]

    (victim,) = executor_0()
    others = sorted(p for p in procfs.children(proc.pid) if " -m executor" not in procfs.cmdline(p))  # blockmgr, gateway
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # restarted, its model loaded and answering the gateway's probes
        replacement = [p for p in executor_0() if p != victim]
        healthy = {}
        if replacement:
            listing = httpx.get(stack["base"] + "/admin/executors", timeout=10).json()["executors"]
            healthy = {e["executor_id"]: e["healthy"] for e in listing}
        if healthy.get("executor-0"):
            break
        assert proc.poll() is None, "serve stopped instead of restarting the executor"
        assert time.monotonic() < deadline, "the killed executor was not restarted"
        time.sleep(0.5)
    assert "executor-0 exited unexpectedly (signal SIGKILL); restarting it" in stack["log"].read_text()
    assert all(p in procfs.children(proc.pid) for p in others), "the others kept running"
    for _ in range(4):  # both executors take requests (least loaded, then round-robin)
        r = httpx.post(stack["base"] + "/v1/completions", json={"prompt": "The capital of France is",
                                                                "max_tokens": 4, "temperature": 0}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
    stats = httpx.get(stack["base"] + "/admin/cache", timeout=10).json()["executors"]
    assert stats["executor-0"]["device"]["used"] == 0 and stats["executor-1"]["device"]["used"] == 0


def test_serve_restarts_a_dead_block_manager_and_the_executors_register_again(stack):
    """Without Redis the restarted block manager starts empty: each executor registers again (a
    step it sends is refused as unknown) and requests are served as before."""
    proc = stack["proc"]
    (victim,) = [p for p in procfs.children(proc.pid) if " -m blockmgr" in procfs.cmdline(p)]
    before = httpx.post(stack["base"] + "/v1/completions", json={"prompt": "The capital of France is",
                                                                 "max_tokens": 4, "temperature": 0}, timeout=120)
    assert before.status_code == 200
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # restarted and both executors known to it again
        try:
            stats = httpx.get(stack["base"] + "/admin/cache", timeout=5)
            if stats.status_code == 200 and {"executor-0", "executor-1"} <= set(stats.json()["executors"]):
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "serve stopped instead of restarting the block manager"
        assert time.monotonic() < deadline, "the executors did not register with the restarted block manager"
        for _ in range(2):  # a step makes an executor find out (only an executor with work sends steps)
            try:
                httpx.post(stack["base"] + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=30)
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    assert "blockmgr exited unexpectedly (signal SIGKILL); restarting it" in stack["log"].read_text()
    for _ in range(2):
        after = httpx.post(stack["base"] + "/v1/completions", json={"prompt": "The capital of France is",
                                                                    "max_tokens": 4, "temperature": 0}, timeout=120)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
