"""This executor's link to the block manager: registration, and one step at a time with retries.

Each step carries a step id, which makes a retry safe: a block manager that applied the step but
lost the reply (it restarted from Redis) answers the same step id with the same reply. A block
manager that lost this executor (it restarted without Redis) gets it registered again; then
nothing of the step was applied and every sequence must restart by recompute.
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
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                return self.client.step(self.executor_id, step_id=self.step_id, incarnation=self.incarnation, **lists)
            except BlockManagerUnavailable as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s; retrying step %d", exc, self.step_id)
                time.sleep(0.2)
            except UnknownExecutor as exc:
                log.warning("%s; registering again: every sequence restarts by recompute", exc)
                self.register()
                return None
