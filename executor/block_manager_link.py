"""This executor's link to the block manager: registration, and one step at a time with retries.

A step is sent and answered in one call (:meth:`BlockManagerLink.step`), or sent first and
answered later (:meth:`~BlockManagerLink.send`, then :meth:`~BlockManagerLink.finish`), so that
its round trip overlaps a forward pass. Each step carries a step id, which makes a retry safe: a
block manager that applied the step but lost the reply (it restarted from Redis) answers the same
step id with the same reply. A block manager that lost this executor (it restarted without Redis)
gets it registered again; then nothing of the step was applied and every sequence must restart by
recompute.
"""

from __future__ import annotations

import logging
import time

from blockmgr.client import BlockManagerUnavailable, UnknownExecutor

log = logging.getLogger("pagedserve.executor")


class BlockManagerLink:
    """Sends one executor's registration and steps through a ``blockmgr.client`` client.

    Args:
        client: the client (service or in-process).
        executor_id, incarnation: this executor's name and this process's id at the block manager.
        num_blocks, block_size, num_cpu_blocks, cost: what it registers (its pools and the
            swap-or-recompute cost model, ``executor.cost_probe``).
        patience_s: how long :meth:`step` retries a block manager that does not answer.
    """

    def __init__(self, client, executor_id: str, incarnation: str, num_blocks: int, block_size: int,
                 num_cpu_blocks: int, cost: dict, patience_s: float = 120.0):
        self.client = client
        self.executor_id = executor_id
        self.incarnation = incarnation
        self._pools = (num_blocks, block_size, num_cpu_blocks, cost)
        self.patience_s = patience_s
        self.step_id = 0
        self._sent: dict | None = None  # the lists of the step send() sent, until finish()
        self._pending = None  # its blockmgr.client.PendingStep

    def register(self) -> dict:
        """Register (again) with the block manager; a new incarnation drops what an earlier one held."""
        return self.client.register(self.executor_id, *self._pools, incarnation=self.incarnation)

    def step(self, **lists) -> dict | None:
        """Send the next step (the block manager's ``step`` lists: fork, free, grow, swap_in, admit).

        Returns:
            The block manager's reply, or None when it had lost this executor: it is registered
            again and nothing of the step was applied.

        Raises:
            blockmgr.client.BlockManagerUnavailable: no answer within ``patience_s`` of retries.
            blockmgr.client.StaleIncarnation: a newer process registered under ``executor_id``.
        """
        self.step_id += 1
        return self._until_answered(lists, time.monotonic() + self.patience_s)

    def send(self, **lists) -> None:
        """Send the next step and return at once: :meth:`finish` waits for its reply (pipelined
        scheduling: the round trip overlaps the caller's forward pass). A send that fails is
        retried by :meth:`finish`."""
        self.step_id += 1
        self._sent = lists
        try:
            self._pending = self.client.send_step(self.executor_id, step_id=self.step_id,
                                                  incarnation=self.incarnation, **lists)
        except BlockManagerUnavailable as exc:
            log.warning("%s; retrying step %d", exc, self.step_id)
            self._pending = None

    def finish(self) -> dict | None:
        """The reply to the step :meth:`send` sent; returns and raises as :meth:`step`."""
        lists, self._sent = self._sent, None
        pending, self._pending = self._pending, None
        deadline = time.monotonic() + self.patience_s
        if pending is not None:
            try:
                return pending.reply()
            except BlockManagerUnavailable as exc:
                log.warning("%s; retrying step %d", exc, self.step_id)
            except UnknownExecutor as exc:
                return self._register_again(exc)
        return self._until_answered(lists, deadline)

    def _until_answered(self, lists: dict, deadline: float) -> dict | None:
        """Send step ``step_id`` until it is answered (the block manager answers a repeated step id
        with the reply it already gave, so a retry is never applied twice)."""
        while True:
            try:
                return self.client.step(self.executor_id, step_id=self.step_id, incarnation=self.incarnation, **lists)
            except BlockManagerUnavailable as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s; retrying step %d", exc, self.step_id)
                time.sleep(0.2)
            except UnknownExecutor as exc:
                return self._register_again(exc)

    def _register_again(self, exc: UnknownExecutor) -> None:
        log.warning("%s; registering again: every sequence restarts by recompute", exc)
        self.register()
        return None
