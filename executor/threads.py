"""How many torch intra-op threads an executor runs by default (no torch import: the CLI uses it).

One executor gets every core this process may run on; several split them evenly. The cores
counted are the affinity mask's (``os.sched_getaffinity``: what ``taskset``, ``numactl`` or a
container's cpuset allow), not ``os.cpu_count()``, which counts the machine's.

Why not keep a core free for the gateway and block manager: on a dedicated 2-core Xeon (issue 14)
two threads gave 1.5x the output tokens/s of one at 1, 16 and 64 concurrent requests through the
whole HTTP stack, the gateway and block manager included.
"""

from __future__ import annotations

import os

#: Set by ``pagedserve serve`` for its executors: why it gave them the thread count it did (their
#: own start-up log repeats it rather than crediting a flag nobody passed).
THREADS_REASON_ENV = "PAGEDSERVE_THREADS_REASON"


def usable_cores() -> int:
    """The number of CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def default_num_threads(num_executors: int = 1) -> tuple[int, str]:
    """Default torch threads per executor and the reason, for the start-up log.

    Args:
        num_executors: executors sharing this machine's usable cores (>= 1).

    Returns:
        ``(threads, reason)``: ``usable_cores() // num_executors`` (at least 1), and e.g.
        ``"2 usable cores, 1 executor"``.

    Raises:
        ValueError: ``num_executors < 1``.
    """
    if num_executors < 1:
        raise ValueError(f"num_executors must be >= 1, got {num_executors}")
    cores = usable_cores()
    plural = "s" if num_executors > 1 else ""
    return max(1, cores // num_executors), f"{cores} usable cores, {num_executors} executor{plural}"


#: OpenMP's variables that place threads on cores (libgomp reads them when torch loads).
PLACEMENT_VARS = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")


def thread_placement(environ: dict[str, str] | None = None) -> str:
    """How the executor's OpenMP threads are placed, for the start-up log.

    We do not pin them: the gateway, the block manager and the clients share the cores, and a
    pinned thread cannot move off a core one of them is using (bf16 at 64 concurrent requests on
    a 2-core Xeon: 503-520 output tokens/s pinned with ``OMP_PROC_BIND=close OMP_PLACES=cores``
    against 802-869 unpinned; docs/design.md, "CPU threads"). An operator's own variables win.

    Returns:
        e.g. ``"not pinned to cores"`` or ``"placed by OMP_PROC_BIND=close OMP_PLACES=cores"``.
    """
    env = os.environ if environ is None else environ
    given = [f"{name}={env[name]}" for name in PLACEMENT_VARS if env.get(name)]
    if not given or env.get("OMP_PROC_BIND", "").strip().lower() == "false":
        return "not pinned to cores"
    return "placed by " + " ".join(given)
