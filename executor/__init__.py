"""Executor: one process per device; owns the model, the KV cache tensors and the scheduler."""
