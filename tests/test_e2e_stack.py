"""The real stack as OS processes: `pagedserve serve` -> block manager, executor, gateway.

Asked through the official `openai` client, the way a user would.
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

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")


@pytest.fixture(scope="module")
def stack(smollm_dir, tmp_path_factory):
    from tests.conftest import _free_port

    port = _free_port()
    log_path = tmp_path_factory.mktemp("stack") / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from gateway.cli import main; main()", "serve", "--port", str(port),
         "--blockmgr-port", str(_free_port()), "--executor-base-port", str(_free_port()),
         "--num-blocks", "256", "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"stack did not become healthy:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    yield {"proc": proc, "base": base, "log": log_path}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    log.close()


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_three_service_processes(stack):
    names = sorted(_cmdline(pid).split(" -m ")[1].split()[0] for pid in _children(stack["proc"].pid))
    assert names == ["blockmgr", "executor", "gateway"]


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
        cache = httpx.get(stack["base"] + "/admin/cache").json()
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
    ({"prompt": "hi", "model": "gpt-5"}, "model"),
])
def test_bad_completion_requests_get_400(stack, body, param):
    r = httpx.post(stack["base"] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param


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


def test_a_dead_child_stops_serve_with_its_name(stack):
    """Runs last: kills the executor and expects serve to exit, naming it."""
    proc = stack["proc"]
    executor = next(p for p in _children(proc.pid) if " -m executor" in _cmdline(p))
    others = [p for p in _children(proc.pid) if p != executor]
    os.kill(executor, signal.SIGKILL)
    assert proc.wait(30) == 1
    assert "executor-0 exited unexpectedly" in stack["log"].read_text()
    for pid in others:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
