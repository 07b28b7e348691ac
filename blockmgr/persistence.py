"""Durable block-manager state in Redis (``--redis-url``): a snapshot plus a step log per executor.

Per executor id two keys:

- ``pagedserve:blockmgr:executor:<id>``: a full snapshot (msgpack of
  :meth:`~blockmgr.manager.BlockManager.snapshot`: pools with refcounts and free-queue order, block
  tables, prefix-cache hashes, counters, incarnation, the last step's reply);
- ``pagedserve:blockmgr:log:<id>``: a Redis list of the requests applied since that snapshot, each
  the msgpack request exactly as the block manager applied it.

After a request changes state and before its reply goes out, the request is appended to its
executor's log with one ``RPUSH`` (one round trip; its size is the step's, not the pool's). The
block manager is deterministic (no clocks, no randomness, per-executor arrival counters), so
snapshot + replay of the log rebuilds exactly the state it had, including the last reply, which
lets an executor retry a step whose reply was lost without it being applied twice.

Compaction keeps the log short: once a log has grown as large (bytes) as its snapshot, or to
``compact_every`` records, a fresh snapshot replaces the records it covers. It runs off the step
path: the step thread only takes a private copy of the state
(:meth:`~blockmgr.manager.BlockManager.snapshot`) and notes how many records the log then held
(``covered``); a background thread serializes the copy and, in one ``MULTI``/``EXEC``, writes it
and trims exactly those ``covered`` records from the head of the log (``LTRIM``), while steps go on
appending behind them. Whatever instant the process dies at, Redis holds a snapshot plus every
record after it: the old snapshot and the whole log before the transaction, the new snapshot and
the records after ``covered`` once it has run. Compacting by size keeps Redis below about twice the
state and the amortized cost proportional to the bytes the steps wrote, i.e. O(what each step
changed); the record cap bounds the replay at a restart. A ``register`` (and the rare changes that
are no replayable request, and a heal after an outage) still write a full snapshot inline, which
supersedes any compaction not yet written.

When Redis does not answer, the block manager keeps serving from memory: replies carry
``"durable": false``, the error is logged (at once, then every ``warn_every_s``), and the stats of
every executor show ``persistence.ok = false`` (the gateway's ``/admin/cache`` and its
``pagedserve:blockmgr_persistence_ok`` metric). At most every ``retry_every_s`` the store tries
again; once Redis answers, every executor's full snapshot is written (and its log emptied) before
anything else, and replies are durable again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import msgpack
import redis

from blockmgr.manager import DeferredRows

log = logging.getLogger("pagedserve.blockmgr")

KEY_PREFIX = "pagedserve:blockmgr:executor:"
LOG_PREFIX = "pagedserve:blockmgr:log:"


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


#: Items of a long list packed per call by :func:`pack_in_slices`: a few milliseconds of work.
SLICE_ITEMS = 2048


def _large(o, slice_items: int) -> bool:
    return isinstance(o, (DeferredRows, dict)) or (
        isinstance(o, (list, tuple)) and (len(o) > slice_items or any(_large(x, slice_items) for x in o)))


def pack_in_slices(obj, slice_items: int = SLICE_ITEMS) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)``, the same bytes, packed a slice at a time.

    msgpack packs a whole object in one C call that holds the GIL: for a 256k-block snapshot
    (~37 MB) that is hundreds of milliseconds during which the block manager's step thread cannot
    run, so packing "in the background" would still pause the steps. Here maps are walked in
    Python and lists longer than ``slice_items`` are packed ``slice_items`` elements per call,
    each slice's own array header cut off behind one header for the whole list (the msgpack spec:
    an array is its header followed by its elements), so the step thread gets the GIL back
    between calls.

    Args:
        obj: what :meth:`blockmgr.manager.BlockManager.snapshot` returns (dicts, lists, tuples,
            str, bytes, int, float, bool, None, and :class:`~blockmgr.manager.DeferredRows`,
            packed as the list of its rows).
        slice_items: elements per call for long lists (>= 1).

    Returns:
        The msgpack bytes, equal to ``msgpack.packb(obj, use_bin_type=True)``.
    """
    packer = msgpack.Packer(use_bin_type=True)
    parts: list[bytes] = []

    def walk(o) -> None:
        if isinstance(o, DeferredRows):
            parts.append(packer.pack_array_header(len(o)))
            for piece in o.slices(slice_items):
                parts.append(packer.pack(piece)[len(packer.pack_array_header(len(piece))) :])
        elif isinstance(o, dict):
            parts.append(packer.pack_map_header(len(o)))
            for k, v in o.items():
                parts.append(packer.pack(k))
                walk(v)
        elif isinstance(o, (list, tuple)) and len(o) > slice_items:
            parts.append(packer.pack_array_header(len(o)))
            for i in range(0, len(o), slice_items):
                piece = list(o[i : i + slice_items])
                parts.append(packer.pack(piece)[len(packer.pack_array_header(len(piece))) :])
        elif isinstance(o, (list, tuple)) and any(_large(x, slice_items) for x in o):
            parts.append(packer.pack_array_header(len(o)))  # e.g. the sequences, each with its tokens
            for x in o:
                walk(x)
        else:
            parts.append(packer.pack(o))

    walk(obj)
    return b"".join(parts)


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass
class _Compaction:
    """A snapshot to write off the step path: it covers the log's records up to ``covered``
    (counted since the log was last emptied), and is void if ``epoch`` is no longer current (an
    inline snapshot replaced the log since)."""

    executor_id: str
    snapshot: dict
    covered: int
    epoch: int


class RedisStore:
    """Saves and loads :class:`~blockmgr.manager.BlockManager` state as snapshots plus step logs.

    Args:
        url: a Redis URL, e.g. ``redis://127.0.0.1:6379/0``.
        compact_every: most log records per executor before a fresh snapshot replaces them (a log
            as large as its snapshot is compacted sooner).
        retry_every_s: while Redis is down, how often (seconds) to try it again.
        warn_every_s: while Redis is down, how often (seconds) to log that changes are not durable.
        timeout_s: socket timeout of each Redis call (seconds); a hung Redis costs a step this much.

    Raises:
        redis.ConnectionError: (from :meth:`ping` and :meth:`load`) the server does not answer.
    """

    def __init__(self, url: str, compact_every: int = 10_000, retry_every_s: float = 1.0, warn_every_s: float = 10.0,
                 timeout_s: float = 2.0):
        if compact_every < 1:
            raise ValueError(f"compact_every must be >= 1, got {compact_every}")
        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.compact_every = compact_every
        self.retry_every_s = retry_every_s
        self.warn_every_s = warn_every_s
        # Records (and their bytes) in each executor's log that no snapshot, written or being
        # written, covers yet: what decides the next compaction.
        self.log_len: dict[str, int] = {}
        self.log_bytes: dict[str, int] = {}
        self.snapshot_bytes: dict[str, int] = {}  # size of each executor's last snapshot
        self._appended: dict[str, int] = {}  # records pushed since the log was last emptied
        self._trimmed: dict[str, int] = {}  # of those, removed from the head by compactions
        self._epoch: dict[str, int] = {}  # bumped by every inline snapshot (it empties the log)
        # Held while writing a snapshot, so an inline one and a background one never interleave.
        self._write_lock = threading.Lock()
        self._jobs: queue.Queue[_Compaction | None] = queue.Queue()
        self._pending = 0  # compactions queued or being written (see wait_compacted)
        self._compacting: set[str] = set()  # executors with one queued or being written: one at a time
        self._idle = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name="redis-compaction", daemon=True)
        self._writer.start()
        self.ok = True
        self.error: str | None = None
        self.down_since: float | None = None  # time.monotonic() of the first failure
        self.not_durable = 0  # changes applied while Redis was down
        self._next_retry = 0.0
        self._next_warn = 0.0

    def ping(self) -> None:
        self.redis.ping()

    # -- writing -------------------------------------------------------------------------------
    def record(self, manager, message: dict, payload: bytes | None = None) -> bool:
        """Make one applied request durable; call it after the change and before the reply.

        Args:
            manager: the :class:`~blockmgr.manager.BlockManager` that applied ``message``.
            message: the decoded request (``register``, ``step`` or ``reset_prefix_cache``).
            payload: ``message`` as received (msgpack), appended as is to spare an encode.

        Returns:
            True when the change is in Redis; False when Redis is down (the change lives in
            memory only until Redis is back and :meth:`heal` writes full snapshots). Never raises.
        """
        manager.persistence = self.status
        if not self.ok and not self.heal(manager):
            self.not_durable += 1
            return False
        op = message.get("op")
        ex_id = message.get("executor_id")
        try:
            if op == "register":
                self._snapshot(manager, [str(ex_id)])
            elif ex_id is not None:
                self._append(manager, {str(ex_id): payload or _pack(message)})
            else:  # a prefix-cache reset of every executor: one record in each log
                self._append(manager, {e: _pack({**message, "executor_id": e}) for e in manager.executors})
        except redis.RedisError as exc:
            self._failed(manager, exc)
            self.not_durable += 1
            return False
        return True

    def record_snapshot(self, manager, executor_ids=None) -> bool:
        """Make a change that is no replayable request (pins, their expiry) durable as full snapshots
        of ``executor_ids`` (default: every executor). Returns and fails like :meth:`record`."""
        manager.persistence = self.status
        if not self.ok and not self.heal(manager):
            self.not_durable += 1
            return False
        try:
            self._snapshot(manager, list(manager.executors if executor_ids is None else executor_ids))
        except redis.RedisError as exc:
            self._failed(manager, exc)
            self.not_durable += 1
            return False
        return True

    def _append(self, manager, records: dict[str, bytes]) -> None:
        pipe = self.redis.pipeline(transaction=len(records) > 1)
        for e, r in records.items():
            pipe.rpush(LOG_PREFIX + e, r)
        pipe.execute()
        for e, r in records.items():
            self._appended[e] = self._appended.get(e, 0) + 1
            self.log_len[e] = self.log_len.get(e, 0) + 1
            self.log_bytes[e] = self.log_bytes.get(e, 0) + len(r)
            due = self.log_len[e] >= self.compact_every or self.log_bytes[e] >= self.snapshot_bytes.get(e, 0)
            if due and e not in self._compacting:
                self._compact_later(manager, e)

    def _compact_later(self, manager, executor_id: str) -> None:
        """Copy the state now (it includes every record appended so far) and write it in the background."""
        job = _Compaction(executor_id, manager.snapshot(executor_id, deferred=True),
                          self._appended.get(executor_id, 0),
                          self._epoch.get(executor_id, 0))
        self.log_len[executor_id], self.log_bytes[executor_id] = 0, 0
        with self._idle:
            self._pending += 1
            self._compacting.add(executor_id)
        self._jobs.put(job)

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._write_compaction(job)
            except Exception as exc:  # Redis down or refusing: the log stays whole, so nothing is lost
                log.warning("compaction of executor %s's step log failed (%s: %s); the log is kept and compacted "
                            "later", job.executor_id, type(exc).__name__, exc)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._compacting.discard(job.executor_id)
                    self._idle.notify_all()

    def _write_compaction(self, job: _Compaction) -> None:
        data = pack_in_slices(job.snapshot)  # the O(state) work, off the step path and yielding the GIL
        e = job.executor_id
        with self._write_lock:
            trimmed = self._trimmed.get(e, 0)
            if job.epoch != self._epoch.get(e, 0) or job.covered <= trimmed:
                return  # an inline snapshot, or a later compaction, already holds this state
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(KEY_PREFIX + e, data)
            pipe.ltrim(LOG_PREFIX + e, job.covered - trimmed, -1)
            pipe.execute()
            self._trimmed[e] = job.covered
            self.snapshot_bytes[e] = len(data)

    def wait_compacted(self, timeout_s: float = 30.0) -> bool:
        """Wait until every compaction queued so far is written (or failed); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the queued compactions and stop the background writer."""
        self._jobs.put(None)
        self._writer.join(timeout_s)

    def _snapshot(self, manager, executor_ids) -> None:
        """Full snapshots of ``executor_ids`` and empty logs, atomically, now (in the caller's thread)."""
        snaps = {e: _pack(manager.snapshot(e)) for e in executor_ids}
        with self._write_lock:
            pipe = self.redis.pipeline(transaction=True)
            for e, snap in snaps.items():
                pipe.set(KEY_PREFIX + e, snap)
                pipe.delete(LOG_PREFIX + e)
            pipe.execute()
            for e, snap in snaps.items():
                self._epoch[e] = self._epoch.get(e, 0) + 1  # compactions still queued are void
                self._appended[e] = self._trimmed[e] = 0
                self.log_len[e], self.log_bytes[e], self.snapshot_bytes[e] = 0, 0, len(snap)

    def invalidate(self, manager) -> None:
        """The in-memory state may have changed without a record (an internal error mid-request):
        the next write is a full snapshot of every executor."""
        self._set_status(manager, ok=False, error="state changed by a failed request; re-snapshotting")
        self._next_retry = 0.0

    # -- health --------------------------------------------------------------------------------
    def heal(self, manager) -> bool:
        """While Redis is down, try it again (at most every ``retry_every_s``); once it answers,
        write every executor's full snapshot. While it is up, ping it as often, so that an outage
        shows in the stats even when no change is being written. Returns whether the store is
        healthy now."""
        now = time.monotonic()
        if now < self._next_retry:
            return self.ok
        self._next_retry = now + self.retry_every_s
        if self.ok:
            try:
                self.redis.ping()
            except redis.RedisError as exc:
                self._failed(manager, exc)
            return self.ok
        try:
            self.redis.ping()
            self._snapshot(manager, list(manager.executors))
        except redis.RedisError as exc:
            self._failed(manager, exc)
            return False
        log.warning("Redis at %s is back: wrote full snapshots of %d executors after %d changes that were not "
                    "durable", self.url, len(manager.executors), self.not_durable)
        self.not_durable = 0
        self._set_status(manager, ok=True, error=None)
        return True

    def _failed(self, manager, exc: Exception) -> None:
        now = time.monotonic()
        if self.ok or now >= self._next_warn:
            log.error("Redis at %s failed (%s): serving from memory, changes are NOT durable until it is back "
                      "(%d so far)", self.url, exc, self.not_durable)
            self._next_warn = now + self.warn_every_s
        if self.ok:
            self._next_retry = now + self.retry_every_s
        self._set_status(manager, ok=False, error=f"{type(exc).__name__}: {exc}")

    def _set_status(self, manager, ok: bool, error: str | None) -> None:
        if not ok and self.down_since is None:
            self.down_since = time.monotonic()
        if ok:
            self.down_since = None
        self.ok, self.error = ok, error
        manager.persistence = self.status

    def status(self) -> dict:
        """``{"backend", "ok", "error", "down_for_s", "changes_not_durable"}`` (for the stats)."""
        return {
            "backend": "redis", "ok": self.ok, "error": self.error,
            "down_for_s": None if self.down_since is None else round(time.monotonic() - self.down_since, 3),
            "changes_not_durable": self.not_durable,
        }

    # -- reading -------------------------------------------------------------------------------
    def load(self, manager) -> int:
        """Restore every saved executor into ``manager``: its snapshot, then its log replayed.

        KV events are not published during the replay (subscribers saw them the first time).

        Returns:
            How many executors were restored.
        """
        from blockmgr.server import handle  # the same dispatch that applied the records

        on_events, manager.on_events = manager.on_events, None
        n = 0
        try:
            for key in self.redis.scan_iter(match=KEY_PREFIX + "*"):
                raw = self.redis.get(key)
                snap = _unpack(raw)
                manager.restore(snap)
                ex_id = snap["executor_id"]
                records = self.redis.lrange(LOG_PREFIX + ex_id, 0, -1)
                for i, record in enumerate(records):
                    reply = handle(manager, _unpack(record))
                    if not reply["ok"]:
                        log.error("executor %s: log record %d of %d did not replay: %s", ex_id, i, len(records),
                                  reply["error"])
                self.log_len[ex_id] = self._appended[ex_id] = len(records)
                self._trimmed[ex_id] = 0
                self.log_bytes[ex_id] = sum(map(len, records))
                self.snapshot_bytes[ex_id] = len(raw)
                n += 1
                log.info("restored executor %s from Redis: snapshot + %d log records, %d sequences",
                         ex_id, len(records), len(manager.executors[ex_id].seqs))
        finally:
            manager.on_events = on_events
        manager.persistence = self.status
        return n
