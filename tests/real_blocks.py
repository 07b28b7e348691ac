"""A gateway app whose fake executors take their KV blocks from a real block manager."""

import threading

from blockmgr.client import InProcessBlockManager
from blockmgr.manager import BlockManager
from gateway.app import create_app
from gateway.settings import GatewaySettings
from gateway.testing import FakeExecutor

BS = 16


class RealBlocks(InProcessBlockManager):
    """The block-manager API over a real BlockManager, plus the calls FakeExecutor makes
    (lookup, grow, free, publish), each turned into block-manager steps. Thread-safe: the gateway
    calls the client from worker threads while fake executors run in the event loop."""

    def __init__(self, manager):
        super().__init__(manager)
        self._lock = threading.RLock()
        self._prompts = {}  # executor id -> (prompt, salt) of the request that is starting

    def _call(self, message):
        with self._lock:
            return super()._call(message)

    def register(self, executor_id, num_device_blocks, block_size, num_cpu_blocks=0, cost=None):
        return super().register(executor_id, num_device_blocks, block_size, num_cpu_blocks, cost)

    def lookup(self, executor_id, token_ids, cache_salt):
        with self._lock:
            self._prompts[executor_id] = (list(token_ids), cache_salt)
            return 0  # the admission in grow() reports the real figure to the block manager's counters

    def grow(self, executor_id, seq_id, num_tokens):
        with self._lock:
            seqs = self.manager.executors[executor_id].seqs
            if seq_id not in seqs:
                prompt, salt = self._prompts[executor_id]
                self.step(executor_id, admit=[[seq_id, prompt, len(prompt), salt, 0]])
            seq = seqs.get(seq_id)
            if seq is not None and num_tokens > seq.num_tokens:
                self.step(executor_id, grow=[[seq_id, num_tokens, [0] * (num_tokens - seq.num_tokens)]])

    def free(self, executor_id, seq_id):
        with self._lock:
            if seq_id in self.manager.executors[executor_id].seqs:
                self.step(executor_id, free=[seq_id])

    def publish(self, executor_id, token_ids, cache_salt):
        """Nothing to do: the block manager publishes computed blocks itself."""


def real_app(tok, num_executors=2, num_blocks=64, pin_share=0.5, token_delay_s=0.0):
    """An app over ``num_executors`` FakeExecutors sharing one real block manager.

    Returns:
        (app, [FakeExecutor], RealBlocks); ``RealBlocks.manager`` is the BlockManager.
    """
    bm = RealBlocks(BlockManager(watermark=0, pin_share=pin_share))
    executors = [FakeExecutor(f"executor-{i}", bm, tok, num_blocks=num_blocks, block_size=BS,
                              token_delay_s=token_delay_s) for i in range(num_executors)]
    settings = GatewaySettings(model_dir="unused", served_model_name="fake-model", executors=[], blockmgr="",
                               max_model_len=2048, health_interval_s=0.2)
    return create_app(settings, executors=executors, blockmgr=bm, tokenizer=tok), executors, bm
