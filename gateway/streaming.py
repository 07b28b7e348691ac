"""Server-sent events, and tying a request's lifetime to its client's connection.

A client that disconnects aborts its request on the executor, whether it was streaming or not:

- streamed: Starlette cancels the response's body iterator when the client goes away; the
  cancellation runs the executor client's ``finally`` which sends ``abort`` without awaiting;
- not streamed (and while a streamed request waits for its first token): :func:`until_disconnect`
  races the work against the ASGI ``http.disconnect`` message and cancels the work first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from gateway.errors import APIError

log = logging.getLogger("pagedserve.gateway")

DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


def sse(obj: Any) -> str:
    """One ``data:`` event."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable):
    """Await ``work``; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class _EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always runs ``cleanup`` when it ends, however it ends: a client
    that disconnects before the first byte never starts the body iterator, whose ``finally``
    blocks would then never run."""

    def __init__(self, content, cleanup: Callable[[], Awaitable] | None, **kwargs):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._cleanup is not None:
                await self._cleanup()


def event_stream(events: AsyncIterator[str], request_id: str,
                 cleanup: Callable[[], Awaitable] | None = None) -> StreamingResponse:
    """An SSE response of ``events`` (already ``data:`` lines), ending with ``data: [DONE]``.

    An APIError raised mid-stream becomes an ``{"error": ...}`` event before ``[DONE]``; so does
    any other exception (as an internal error), so every stream ends with ``[DONE]``.
    ``cleanup`` runs when the response ends, even if ``events`` never started (use it to abort
    the request's runs).
    """

    async def body():
        try:
            async for chunk in events:
                yield chunk
        except APIError as exc:
            log.warning("request %s failed mid-stream: %s", request_id, exc.message)
            yield sse(exc.body())
        except Exception as exc:  # a bug: the client still gets an error event and [DONE]
            log.exception("request %s failed mid-stream", request_id)
            yield sse(APIError(500, f"internal error: {type(exc).__name__}", "internal_error").body())
        yield DONE

    return _EventStreamResponse(body(), cleanup, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
