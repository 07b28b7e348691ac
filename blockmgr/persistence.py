"""Durable block-manager state in Redis (``--redis-url``).

After every request that changes an executor's state, and before the reply goes out, the
executor's whole state (pools with refcounts and free-queue order, block tables, prefix-cache
hashes, counters, and the last step's reply) is written as one msgpack value under
``pagedserve:blockmgr:executor:<id>``. One ``SET`` per change keeps each executor's state atomic;
a restarted block manager loads every key and resumes where it stopped. Because the last reply is
saved with the state, an executor that retries a step whose reply was lost gets that reply again
instead of having the step applied twice.
"""

from __future__ import annotations

import logging

import msgpack
import redis

log = logging.getLogger("pagedserve.blockmgr")

KEY_PREFIX = "pagedserve:blockmgr:executor:"


class RedisStore:
    """Saves and loads :class:`~blockmgr.manager.BlockManager` state.

    Args:
        url: a Redis URL, e.g. ``redis://127.0.0.1:6379/0``.

    Raises:
        redis.ConnectionError: (from :meth:`ping`) the server does not answer.
    """

    def __init__(self, url: str):
        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=5)

    def ping(self) -> None:
        self.redis.ping()

    def save(self, manager, executor_ids) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for ex_id in executor_ids:
            pipe.set(KEY_PREFIX + ex_id, msgpack.packb(manager.snapshot(ex_id), use_bin_type=True))
        pipe.execute()

    def load(self, manager) -> int:
        """Restore every saved executor into ``manager``; returns how many."""
        n = 0
        for key in self.redis.scan_iter(match=KEY_PREFIX + "*"):
            snap = msgpack.unpackb(self.redis.get(key), raw=False, strict_map_key=False)
            manager.restore(snap)
            n += 1
            log.info("restored executor %s from Redis: %d sequences", snap["executor_id"], len(snap["seqs"]))
        return n
