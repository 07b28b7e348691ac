"""Cost of making one block-manager step durable in Redis: the old full snapshot vs the step log.

For each pool size (device blocks) an executor holds ``--seqs`` running sequences that fill
``--fill`` of the pool; each measured step grows every sequence by one token (a decode step of the
whole batch). Per step it measures, against a real ``redis-server``:

- old: what the block manager did before the step log: ``msgpack`` of the executor's whole
  snapshot and one ``SET`` (bytes written, microseconds);
- new: :meth:`blockmgr.persistence.RedisStore.record`: one ``RPUSH`` of the step request as
  received (bytes, microseconds), and the same with the compaction amortized: a full snapshot
  once the log is as large as the snapshot, or has ``--redis-compact-every`` records, whichever comes
  first (the block manager's policy). A compaction has a part on the step path (the private
  copy of the state) and a part in the background thread (serialize, ``SET``, ``LTRIM``): only
  the first is amortized into the step's cost; both are reported;
- for scale, the time the block manager itself takes to apply the step.

    python benchmarks/persistence_bench.py                       # 2k, 32k, 256k blocks
    python benchmarks/persistence_bench.py --blocks 2048 --steps 50 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import msgpack
import redis

from benchmarks.settings import BenchmarkSettings
from blockmgr import protocol
from blockmgr.config import BlockManagerSettings
from blockmgr.manager import BlockManager
from blockmgr.persistence import KEY_PREFIX, LOG_PREFIX, RedisStore
from blockmgr.server import handle
from blockmgr.settings import load, reuse, separated_list, setting
from executor.config import ExecutorSettings

EX = "bench"
DURING_MAX = 200  # most steps applied while one compaction is written in the background


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(num_blocks: int, seqs: int, fill: float, block_size: int, steps: int) -> tuple[BlockManager, dict[str, int]]:
    """A manager whose executor holds ``seqs`` sequences using ``fill`` of ``num_blocks`` once
    each has grown by ``steps`` tokens."""
    manager = BlockManager(watermark=0)
    manager.register(EX, num_blocks, block_size, incarnation="bench")
    per_seq = int(num_blocks * fill / seqs) * block_size - steps - 1
    if per_seq < 1:
        raise SystemExit(f"{num_blocks} blocks are too few for {seqs} sequences and {steps} steps")
    lengths = {}
    for i in range(seqs):
        prompt = [(i * 7919 + t) % 49152 for t in range(per_seq)]
        manager.step(EX, incarnation="bench", admit=[(f"s{i}", prompt, per_seq, None, 0)])
        lengths[f"s{i}"] = per_seq
    return manager, lengths


def measure(num_blocks: int, args, url: str) -> dict:
    manager, lengths = setup(num_blocks, args.seqs, args.fill, args.block_size, args.steps + DURING_MAX)
    r = redis.Redis.from_url(url)
    store = RedisStore(url, compact_every=10**9)
    store.snapshot_bytes[EX] = 10**12  # compaction is measured on its own below
    store.record(manager, {"op": "register", "executor_id": EX})  # the starting snapshot
    apply_s, old_s, old_b, new_s, new_b = [], [], [], [], []

    def one_step(k: int) -> None:
        message = {"op": "step", "executor_id": EX, "step_id": k + 2, "incarnation": "bench",
                   "grow": [[sid, n + 1, [k]] for sid, n in lengths.items()]}
        payload = protocol.encode(message)
        t0 = time.perf_counter()
        reply = handle(manager, protocol.decode(payload))
        apply_s.append(time.perf_counter() - t0)
        assert reply["ok"] and not reply["preempted"], reply.get("error") or "pool too small for the steps"
        for sid in lengths:
            lengths[sid] += 1
        t0 = time.perf_counter()
        assert store.record(manager, message, payload)
        new_s.append(time.perf_counter() - t0)
        new_b.append(len(payload))

    for k in range(args.steps):
        one_step(k)
        if k < args.old_steps:
            t0 = time.perf_counter()
            snap = msgpack.packb(manager.snapshot(EX), use_bin_type=True)
            pipe = r.pipeline(transaction=True)
            pipe.set(KEY_PREFIX + "old-" + EX, snap)
            pipe.execute()
            old_s.append(time.perf_counter() - t0)
            old_b.append(len(snap))
    t0 = time.perf_counter()
    store._compact_later(manager, EX)  # one compaction: what the step path does (copy the state, queue it)
    compact_s = time.perf_counter() - t0
    # ... and what the background thread does (serialize, SET, LTRIM) while steps go on: the longest
    # of those steps (apply + record) is what a compaction costs the request path.
    during = []
    while not store.wait_compacted(0) and len(during) < DURING_MAX:
        t1 = time.perf_counter()
        one_step(args.steps + len(during))
        during.append(time.perf_counter() - t1)
    assert store.wait_compacted(600)
    background_s = time.perf_counter() - t0 - compact_s
    compact_b = store.snapshot_bytes[EX]
    assert r.llen(LOG_PREFIX + EX) == len(during), "the compaction covered the log up to its start"
    store.close()
    r.flushdb()
    med = statistics.median
    period = int(min(args.redis_compact_every, max(1, compact_b // med(new_b))))  # steps between compactions
    return {
        "blocks": num_blocks, "tokens": sum(lengths.values()),
        "apply_us": med(apply_s) * 1e6, "old_us": med(old_s) * 1e6, "old_bytes": med(old_b),
        "new_us": med(new_s) * 1e6, "new_bytes": med(new_b),
        "new_amortized_us": med(new_s) * 1e6 + compact_s * 1e6 / period,
        "new_amortized_bytes": med(new_b) + compact_b / period,
        "compact_ms": compact_s * 1e3, "background_ms": background_s * 1e3, "period": period,
        "during_steps": len(during), "during_max_ms": max(during, default=0.0) * 1e3,
    }


class PersistenceBenchSettings(BenchmarkSettings):
    blocks: separated_list(",", int) = setting([2048, 32768, 262144], "device pool sizes, blocks")
    seqs: int = setting(64, "running sequences, each grown by one token a step", ge=1)
    fill: float = setting(0.9, "fraction of the pool in use after the last step", gt=0, le=1)
    block_size: int = reuse(ExecutorSettings, "block_size")
    steps: int = setting(64, "measured steps (new)", ge=1)
    old_steps: int = setting(8, "measured steps of the old full SET", ge=0)
    redis_compact_every: int = reuse(BlockManagerSettings, "redis_compact_every")
    redis_url: str | None = reuse(BlockManagerSettings, "redis_url",
                                  description="the Redis to measure (unset: start a private redis-server)")


def main(argv: list[str] | None = None) -> None:
    args, _ = load(PersistenceBenchSettings, argv, "persistence_bench.py", __doc__.split("\n\n")[0])

    proc = None
    url = args.redis_url
    if url is None:
        port = _free_port()
        tmp = tempfile.mkdtemp()
        proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
                                 "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
    try:
        print(f"{args.seqs} running sequences, {args.fill:.0%} of the pool in use, block size {args.block_size}; "
              f"medians; compaction at the log's size of the snapshot, at most {args.redis_compact_every} records\n")
        print("| device blocks | apply step (µs) | old: full SET (bytes) | old (µs) | new: RPUSH (bytes) | new (µs) "
              "| steps per compaction | new + compaction (bytes) | new + compaction (µs) "
              "| one compaction, step path (ms) | one compaction, background (ms) "
              "| steps during it | longest of them (ms) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in args.blocks:
            m = measure(n, args, url)
            print(f"| {m['blocks']:,} | {m['apply_us']:,.0f} | {m['old_bytes']:,.0f} | {m['old_us']:,.0f} "
                  f"| {m['new_bytes']:,.0f} | {m['new_us']:,.0f} | {m['period']:,} | {m['new_amortized_bytes']:,.0f} "
                  f"| {m['new_amortized_us']:,.0f} | {m['compact_ms']:,.1f} | {m['background_ms']:,.1f} "
                  f"| {m['during_steps']:,} | {m['during_max_ms']:,.1f} |", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
