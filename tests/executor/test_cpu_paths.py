"""The CPU invariance checks again on every MKL and oneDNN code path this machine can take.

Which kernels MKL and oneDNN run depends on the CPU (MKL gives AMD processors its AVX2 path) and
on environment variables read once, when the library starts: ``MKL_CBWR`` (MKL's conditional
numerical reproducibility branch) and ``ONEDNN_MAX_CPU_ISA``. So each path runs in a subprocess
with its variable set, and a developer on one machine sees what another would. The same goes for
the torch implementation of the ordered products (``PAGEDSERVE_ORDERED_MATMUL=torch``), the
plain-torch CPU attention (``PAGEDSERVE_CPU_ATTENTION=torch``) and oneDNN's packed fp32 linear layers
in place of ``kernels.linear_cpu`` (``PAGEDSERVE_LINEAR_CPU=torch``), which machines without a C
compiler use. oneDNN computes fp32 linear layers only there, so its ``ONEDNN_MAX_CPU_ISA`` paths run
with ``PAGEDSERVE_LINEAR_CPU=torch`` too.

A path is skipped only when the CPU cannot take it, as the library itself reports: MKL, asked
for a branch the CPU does not support (every ISA branch on a non-Intel CPU, AVX512 on an
AVX2-only one), runs another one, and ``mkl_cbwr_get`` says which; oneDNN caps its ISA at what
the CPU has, which ATen's CPU capability tells.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = ["tests/executor/test_cpu_invariance.py"]
#: The end-to-end checks that failed on MKL's AVX2 path before the attention had its own products.
END_TO_END = ["tests/executor/test_batch_invariance.py", "-k", "chunked_prefill or preemption"]

#: Exit status of the child when the CPU cannot take the requested path (its last line says why).
_UNSUPPORTED = 77

_CHILD = r"""
import ctypes, os, sys
import torch

var, value, args = sys.argv[1], sys.argv[2], sys.argv[3:]

def unsupported(why):
    print(why)
    sys.exit(%(unsupported)d)

if var == "MKL_CBWR":
    # Branch numbers from MKL's mkl_cbwr.h; MKL_CBWR_BRANCH (1) asks for the branch in use.
    wanted = {"COMPATIBLE": 3, "AVX": 9, "AVX2": 10, "AVX512": 12}[value]
    if not torch.backends.mkl.is_available():
        unsupported("torch is built without MKL")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    get = getattr(lib, "mkl_cbwr_get", None) or getattr(lib, "mkl_serv_cbwr_get", None)
    if get is None:
        unsupported("this torch does not export mkl_cbwr_get: MKL's branch cannot be checked")
    torch.ones(2, 2) @ torch.ones(2, 2)  # MKL reads MKL_CBWR when it starts
    branch = get(1)
    if branch != wanted:
        unsupported(f"this CPU cannot take MKL's {value} branch: MKL runs branch {branch} instead "
                    f"(2 = AUTO: MKL's own choice for this CPU)")
elif var == "ONEDNN_MAX_CPU_ISA":
    need = {"AVX2": ("AVX2", "AVX512"), "AVX512_CORE": ("AVX512",)}[value]
    have = torch.backends.cpu.get_cpu_capability()
    if have not in need:
        unsupported(f"this CPU cannot run oneDNN's {value} kernels (ATen's CPU capability: {have})")
    os.environ["PAGEDSERVE_LINEAR_CPU"] = "torch"  # read at the first linear layer: oneDNN computes them

if args == ["--probe"]:
    sys.exit(0)
import pytest
sys.exit(pytest.main(["-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider", *args]))
""" % {"unsupported": _UNSUPPORTED}

#: oneDNN computes only the linear layers (and only without kernels.linear_cpu), the ordered products
#: only the attention.
LINEAR = [*UNIT, "-k", "linear"]
ATTENTION = [*UNIT, "-k", "attention or plan"]

PATHS = [
    ("MKL_CBWR", "AVX2", UNIT),
    ("MKL_CBWR", "AVX", UNIT),
    ("MKL_CBWR", "AVX512", UNIT),
    ("MKL_CBWR", "COMPATIBLE", UNIT),
    ("ONEDNN_MAX_CPU_ISA", "AVX2", LINEAR),
    ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE", LINEAR),
    ("PAGEDSERVE_LINEAR_CPU", "torch", LINEAR),
    ("PAGEDSERVE_ORDERED_MATMUL", "torch", ATTENTION),
    ("MKL_CBWR", "AVX2", END_TO_END),
    # The plain-torch CPU attention (fp16/bf16 caches, machines without a C compiler) end to end.
    ("PAGEDSERVE_CPU_ATTENTION", "torch", END_TO_END),
]


def _run_child(var: str, value: str, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, var: value, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", _CHILD, var, value, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def _cannot_take(var: str, value: str) -> str | None:
    """Why this CPU cannot take the path (the library's own report, from a probe), or None."""
    proc = _run_child(var, value, ["--probe"], timeout=120)
    return (proc.stdout.strip().splitlines() or ["?"])[-1] if proc.returncode == _UNSUPPORTED else None


@pytest.mark.parametrize("var, value, args", [
    pytest.param(var, value, args, id=f"{var}={value}{'-e2e' if args is END_TO_END else ''}",
                 marks=pytest.mark.skipif(_cannot_take(var, value) is not None,
                                          reason=str(_cannot_take(var, value))))
    for var, value, args in PATHS
])
def test_invariance_on_path(var, value, args):
    proc = _run_child(var, value, args, timeout=900)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, f"{var}={value}:\n{output[-4000:]}"
