"""Prefix-aware routing: send a request to the executor that already caches most of its prompt.

The block manager answers ``match_prefix(token_ids, cache_salt) -> {executor_id: cached tokens}``.
The gateway picks the healthy executor with the longest cached prefix; ties (including "nothing
cached anywhere") go to the least loaded one (requests in flight as the gateway counts them),
then round-robin. If the block manager cannot answer, routing falls back to load alone: a
routing hint is never worth failing a request for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from blockmgr.client import BlockManagerRequestError, BlockManagerUnavailable
from gateway.errors import unavailable
from gateway.executors import ExecutorHandle, ExecutorPool

log = logging.getLogger("pagedserve.gateway")


def choose(handles: list[ExecutorHandle], cached: dict[str, int], turn: int = 0) -> ExecutorHandle:
    """The handle with the most cached tokens, then the least load, then the next in turn."""
    order = {id(h): (i - turn) % len(handles) for i, h in enumerate(handles)}
    return min(handles, key=lambda h: (-int(cached.get(h.executor_id, 0) or 0), h.load, order[id(h)]))


class Router:
    """Picks an executor per request.

    Args:
        pool: the executors.
        blockmgr: a block-manager client with ``match_prefix`` (sync; called in a thread), or None.
    """

    def __init__(self, pool: ExecutorPool, blockmgr=None):
        self.pool = pool
        self.blockmgr = blockmgr
        self._turn = itertools.count()
        self._warned_at = 0.0
        self.supported = blockmgr is not None and hasattr(blockmgr, "match_prefix")

    async def cached_prefixes(self, token_ids: list[int], cache_salt: str | None) -> dict[str, int]:
        """``{executor_id: cached tokens}``; empty when the block manager cannot tell."""
        if not self.supported:
            return {}
        try:
            return dict(await asyncio.to_thread(self.blockmgr.match_prefix, token_ids, cache_salt) or {})
        except BlockManagerRequestError as exc:
            if "unknown op" in str(exc):
                log.info("the block manager does not support match_prefix; routing by load only")
                self.supported = False
            else:
                self._warn(f"match_prefix refused: {exc}")
        except BlockManagerUnavailable as exc:
            self._warn(str(exc))
        return {}

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at > 30:
            self._warned_at = now
            log.warning("prefix-aware routing falls back to load: %s", message)

    async def pick(self, token_ids: list[int], cache_salt: str | None = None) -> tuple[ExecutorHandle, int]:
        """The executor for a prompt, and the cached tokens the block manager reported for it.

        Raises:
            APIError(503): no executor answers.
        """
        handles = await self.pool.available()
        if not handles:
            raise unavailable("no executor is available; retry shortly", "no_executor")
        cached = await self.cached_prefixes(token_ids, cache_salt) if len(handles) > 1 else {}
        h = choose(handles, cached, next(self._turn))
        return h, int(cached.get(h.executor_id, 0) or 0)
