"""The unfinished choices of an ``n > 1`` request after its executor died, each resumed as a lone
request (a *leg*) on some executor, merged back into one stream of outputs (see
:mod:`gateway.generation`, which starts the legs).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from executor.client import ExecutorUnavailable


class ChoiceLegs:
    """The unfinished choices of an n > 1 run after its executor died, each a lone request (a leg)
    on some executor; iterates their outputs as they come, each with ``index`` set to its choice.

    A leg whose executor dies yields its ``unavailable`` error output (with the choice's index),
    so the run resumes that choice alone. Closing closes (aborts) every leg.
    """

    def __init__(self):
        self._legs: dict[int, tuple[Any, str, AsyncIterator[dict]]] = {}  # index -> (handle, leg id, outputs)
        self._next: dict[int, asyncio.Future] = {}
        self._closing: set[asyncio.Future] = set()

    def add(self, index: int, handle, leg_id: str, gen: AsyncIterator[dict]) -> None:
        self._legs[index] = (handle, leg_id, gen)
        self._next[index] = asyncio.ensure_future(gen.__anext__())

    def drop(self, index: int) -> None:
        """Stop following choice ``index``: abort it on its executor now, close its generator soon."""
        leg = self._legs.pop(index, None)
        fut = self._next.pop(index, None)
        if leg is None:
            return
        if fut is not None:
            fut.cancel()
        leg[0].client.abort(leg[1])
        task = asyncio.ensure_future(self._close(fut, leg[2]))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(fut: asyncio.Future | None, gen: AsyncIterator[dict]) -> None:
        if fut is not None:
            await asyncio.gather(fut, return_exceptions=True)
        await gen.aclose()  # its client stops following it (and counting it as load)

    def abort_all(self) -> None:
        for handle, leg_id, _ in self._legs.values():
            handle.client.abort(leg_id)

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        while self._next:
            done, _ = await asyncio.wait(set(self._next.values()), return_when=asyncio.FIRST_COMPLETED)
            fut = next(iter(done))
            index = next(i for i, f in self._next.items() if f is fut)
            gen = self._legs[index][2]
            try:
                msg = fut.result()
            except StopAsyncIteration:
                self._next.pop(index)
                continue
            except ExecutorUnavailable as exc:  # its generate message could not be delivered
                self._next.pop(index)
                return {"finish_reason": "error", "unavailable": True, "error": str(exc), "index": index}
            if msg.get("finish_reason") == "error" or msg.get("finished"):
                self._next.pop(index)
            else:
                self._next[index] = asyncio.ensure_future(gen.__anext__())
            return {**msg, "index": index}
        raise StopAsyncIteration

    async def aclose(self) -> None:
        futures = list(self._next.values())
        for fut in futures:
            fut.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
        for _, _, gen in self._legs.values():
            await gen.aclose()
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._legs.clear()
        self._next.clear()
