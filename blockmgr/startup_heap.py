"""Keep a service's start-up objects out of Python's garbage collector once it is serving.

An executor holds about 370,000 objects the collector tracks after start-up (torch, transformers
and their modules), a gateway about as many; none of them ever becomes garbage. Every full
(generation 2) collection walks all of them: 158-164 ms measured in an executor process with the
bf16 SmolLM2 loaded (2-vCPU Xeon of docs/cpu-step-profile.md), a stall of every stream it serves,
at times the allocation pattern decides. ``gc.freeze()`` (Python's documented way to do this)
moves them to a permanent generation that collections skip: a full collection after it took
under 0.1 ms. Objects created later are collected as before.

At exit the heap is unfrozen again. The interpreter's last collections skip the permanent
generation, so frozen objects that only the collector frees (reference cycles, once the modules
are torn down) stayed alive, and a C extension that checks at exit for its objects reported them:
nanobind, which Triton's ``libtriton`` is built with, printed about 30 "leaked ..." lines on each
executor's stderr after every SIGTERM. Freeing them costs a stop about 0.4 s (an executor's).
"""

from __future__ import annotations

import atexit
import gc
import logging
import time


def freeze_startup_heap(log: logging.Logger) -> int:
    """Collect once, then freeze every object that survives; returns how many were frozen.

    Call it once, at the end of a service's start-up, in the service's own process (never in a
    test process: what it freezes is freed only at exit). Logs one line with the count and how long
    that last full collection took.
    """
    started = time.perf_counter()
    gc.collect()
    took_ms = (time.perf_counter() - started) * 1e3
    gc.freeze()
    # atexit callbacks run before the interpreter's final collections, on every way out (a return,
    # SystemExit, an exception), so the exit code and whatever else runs at exit stay as they were.
    atexit.register(gc.unfreeze)
    frozen = gc.get_freeze_count()
    log.info("%d start-up objects frozen out of garbage collection (a full collection took %.0f ms before)",
             frozen, took_ms)
    return frozen
