"""Block-manager throughput in process and per-step round-trip latency over ZeroMQ.

Simulates an executor decoding ``--seqs`` running sequences: one batched ``step`` per scheduler
step grows every sequence by one token (a new block every ``block_size`` steps; full blocks are
hashed into the prefix cache). Prints:

- in-process throughput: sequence operations (one grow of one sequence) per second;
- over ZeroMQ against a real ``python -m blockmgr`` process: per-step round trip, p50 and p99.

    python benchmarks/blockmgr_bench.py --seqs 256 --steps 200
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.settings import BenchmarkSettings
from blockmgr.client import BlockManagerClient, InProcessBlockManager
from blockmgr.manager import BlockManager
from blockmgr.settings import load, reuse, setting
from executor.config import ExecutorSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def block_manager_process() -> Iterator[BlockManagerClient]:
    """A ``python -m blockmgr`` process (insecure, loopback) for the block, and a client that got
    its first answer."""
    addr = f"tcp://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "blockmgr", "--bind", addr, "--log-level", "WARNING",
                             "--insecure-local"], cwd=Path(__file__).resolve().parent.parent)
    try:
        client = BlockManagerClient(addr, timeout_s=30)
        for _ in range(100):
            try:
                client.ping()
                break
            except Exception:
                time.sleep(0.1)
        yield client
    finally:
        proc.terminate()
        proc.wait(10)


def drive(client, seqs: int, steps: int, prompt_len: int, block_size: int) -> list[float]:
    """Admit ``seqs`` sequences, then time ``steps`` decode steps; returns seconds per step."""
    client.register("bench", num_device_blocks=seqs * (prompt_len + steps) // block_size + seqs * 2,
                    block_size=block_size)
    step_id = 0
    admit = [(f"s{i}", [i * 7 + t for t in range(prompt_len)], prompt_len, None, 0) for i in range(seqs)]
    step_id += 1
    client.step("bench", step_id=step_id, admit=admit)
    lengths = {f"s{i}": prompt_len for i in range(seqs)}
    times = []
    for k in range(steps):
        grow = [(sid, n + 1, [k]) for sid, n in lengths.items()]
        step_id += 1
        t0 = time.perf_counter()
        client.step("bench", step_id=step_id, grow=grow)
        times.append(time.perf_counter() - t0)
        for sid in lengths:
            lengths[sid] += 1
    client.step("bench", step_id=step_id + 1, free=list(lengths))
    return times


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class BlockManagerBenchSettings(BenchmarkSettings):
    seqs: int = setting(256, "running sequences", ge=1)
    steps: int = setting(200, "steps measured", ge=1)
    prompt_len: int = setting(200, "prompt tokens of each sequence", ge=1)
    block_size: int = reuse(ExecutorSettings, "block_size")


def main(argv: list[str] | None = None) -> None:
    args, _ = load(BlockManagerBenchSettings, argv, "blockmgr_bench.py", __doc__.split("\n\n")[0])

    t = drive(InProcessBlockManager(BlockManager()), args.seqs, args.steps, args.prompt_len, args.block_size)
    in_proc_ops = args.seqs * len(t) / sum(t)
    print(f"in process: {in_proc_ops:,.0f} sequence ops/s "
          f"({statistics.mean(t) * 1e3:.2f} ms per step of {args.seqs} sequences, msgpack round trip included)")

    with block_manager_process() as client:
        t = drive(client, args.seqs, args.steps, args.prompt_len, args.block_size)
    print(f"over ZeroMQ: step round trip p50 {pct(t, 0.5) * 1e3:.2f} ms, p99 {pct(t, 0.99) * 1e3:.2f} ms "
          f"({args.seqs} running sequences, {args.steps} steps)")


if __name__ == "__main__":
    main()
