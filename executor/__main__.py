import os

# How long libgomp's idle worker threads spin before they sleep (torch's and our kernels' OpenMP
# team). The default, ~1 ms, is shorter than the single-threaded gaps of a decode step (Python
# between kernel calls, sampling, the block-manager round trip), so every parallel region after
# one woke its workers from a futex: at 64 requests in bf16, 6-7% of the throughput. 10M spins are
# about 0.1 s on this machine: the team stays awake through a step and sleeps when the server is
# idle (0% CPU). libgomp reads it once, when torch loads it, so it is set before any import; an
# operator's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000000"

from executor.server import main  # noqa: E402

main()
