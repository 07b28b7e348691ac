import os
import random
import socket
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

# CI has 2 cores shared by the test process and the services it starts: OpenMP threads that
# outnumber free cores spin against each other and slow everything down many times over.
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton chooses interpreter or compiler when a kernel module is first imported, which may be in
# any test file; setting it here makes that choice the same whichever file runs first or alone.
os.environ.setdefault("TRITON_INTERPRET", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports (``serve --executor-base-port`` takes base..base+n-1).

    Drawn below the kernel's ephemeral range, where neither ``bind(0)`` nor an outgoing connection
    takes a port: the neighbour of a port ``bind(0)`` gave is one connections draw from, and a
    service binds it only after its model has loaded.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    while True:
        base = random.randrange(10_000, max(10_001, low - n))
        try:
            with ExitStack() as held:
                for port in range(base, base + n):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


@pytest.fixture
def free_port():
    return _free_port


@pytest.fixture
def blockmgr_service(monkeypatch):
    """A block-manager service (``blockmgr.server.serve``, insecure, loopback) in a thread of this
    process, and a client connected to it (its ``address`` is the service's)."""
    import threading

    import blockmgr.server as server_mod
    from blockmgr.client import BlockManagerClient

    monkeypatch.setattr(server_mod.signal, "signal", lambda *a: None)  # only the main thread may
    addr = f"tcp://127.0.0.1:{_free_port()}"
    threading.Thread(target=server_mod.serve, args=(addr,), daemon=True).start()
    client = BlockManagerClient(addr, timeout_s=5)
    client.ping()
    yield client
    client.close()


@pytest.fixture(scope="session")
def smollm_dir():
    """The default model converted to a cached HF directory (converted once per machine)."""
    from executor.model_loader import default_model_path, resolve_model_dir

    return resolve_model_dir(default_model_path())


@pytest.fixture(scope="session")
def tok(smollm_dir):
    """SmolLM2's tokenizer, loaded once per session (the gateway's fakes, workloads and engines share it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def smollm(smollm_dir, tok):
    """(our model, tokenizer) for SmolLM2-135M-Instruct in fp32 on the CPU."""
    from executor.model_loader import load_model

    return load_model(smollm_dir), tok
