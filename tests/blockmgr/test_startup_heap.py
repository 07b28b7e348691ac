"""Start-up objects are frozen out of garbage collection, in a child process (freezing in the test
process would keep its objects forever), and the gateway and the block manager freeze their heaps
before serving."""

import subprocess
import sys

CHILD = """
import gc, logging, sys, weakref
import torch, transformers  # a service's start-up heap
from blockmgr.startup_heap import freeze_startup_heap
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
frozen = freeze_startup_heap(logging.getLogger("t"))
print("count", frozen, gc.get_freeze_count())

class Node:
    pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle created after the freeze is still garbage-collected
ref = weakref.ref(a)
del a, b
gc.collect()
print("cycle collected", ref() is None)
"""


def test_freeze_startup_heap_freezes_what_exists_and_still_collects_new_garbage():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    count = [line for line in lines if line.startswith("count ")][0].split()
    assert int(count[1]) == int(count[2]) > 50_000  # torch + transformers alone track far more
    assert any(line.startswith(f"{count[1]} start-up objects frozen out of garbage collection (a full collection took")
               for line in lines)
    assert "cycle collected True" in lines


def test_the_gateway_freezes_its_heap_after_building_the_app(smollm_dir, monkeypatch):
    import gateway.server as server

    calls = []
    monkeypatch.setattr(server, "create_app", lambda settings: calls.append("app") or "APP")
    monkeypatch.setattr(server, "freeze_startup_heap", lambda log: calls.append("freeze"))
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: calls.append(("run", app)))
    server.main(["--model", str(smollm_dir), "--executor", "tcp://127.0.0.1:5999", "--insecure-local"])
    assert calls == ["app", "freeze", ("run", "APP")]


def test_the_block_manager_freezes_its_heap_before_its_state_exists(monkeypatch):
    import blockmgr.server as server

    calls = []
    monkeypatch.setattr(server, "freeze_startup_heap", lambda log: calls.append("freeze"))
    monkeypatch.setattr(server, "BlockManager", lambda *a, **kw: calls.append("manager") or "MANAGER")
    monkeypatch.setattr(server, "serve", lambda bind, manager, *rest: calls.append(("serve", manager)))
    server.main(["--insecure-local", "--bind", "tcp://127.0.0.1:5998"])
    assert calls == ["freeze", "manager", ("serve", "MANAGER")]
