"""Build, cache and load the C kernels of ``kernels/`` (the CPU path's compiled parts).

Each kernel is one C file beside its Python wrapper (``ordered_matmul.c``, ``paged_attention_cpu.c``),
compiled on first use with the system C compiler (``$CC`` or ``cc``) into
``$PAGEDSERVE_KERNEL_CACHE_DIR`` (default ``~/.cache/pagedserve/kernels``), once per source version,
compiler and flags, and loaded with :mod:`ctypes`. An image build compiles them ahead of time
(the wrappers' ``build()``), so a container never needs the compiler at run time.

Every kernel has a torch fallback, used where no C compiler works, on an x86 CPU without FMA (where
``fmaf``, which the kernels' fixed order of summation rests on, is a slow library call), or when the
kernel's environment variable says ``torch``; ``compiled`` there makes a missing compiler an error.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CFLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno")


def kernel_cache_dir() -> Path:
    """``$PAGEDSERVE_KERNEL_CACHE_DIR`` if set, else ``~/.cache/pagedserve/kernels``."""
    env = os.environ.get("PAGEDSERVE_KERNEL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagedserve" / "kernels"


def compile_library(source: Path, cache_dir: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` into ``cache_dir`` (once per source, compiler and flags); the .so path.

    The library is named ``<source stem>-<hash>.so`` and written atomically, so processes that
    compile at once never load a half-written file.

    Raises:
        OSError: no C compiler on ``PATH``; subprocess.SubprocessError: it failed.
    """
    cc = os.environ.get("CC") or "cc"
    cc_path = shutil.which(cc)
    if cc_path is None:
        raise OSError(f"no C compiler {cc!r} on PATH")
    flags = [*CFLAGS, *extra_flags]
    key = hashlib.sha256(source.read_bytes() + " ".join([cc_path, *flags, sys.platform]).encode()).hexdigest()[:16]
    lib = cache_dir / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        subprocess.run([cc_path, *flags, str(source), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load_or_fall_back(source: Path, env_var: str, load: Callable[[Path], ctypes.CDLL], fallback: str,
                      extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernel of ``source``, or None where its torch fallback runs (see the module doc).

    Args:
        source: the C file.
        env_var: the override: unset or empty (compiled where possible), ``compiled`` or ``torch``.
        load: loads a built library and declares its signature.
        fallback: what runs instead, for the warning logged when the compiler fails.
        extra_flags: compiler flags on top of :data:`CFLAGS`.

    Raises:
        ValueError: another value of ``env_var``.
        RuntimeError: ``compiled`` asked for on an x86 CPU without AVX2 and FMA.
        OSError, subprocess.SubprocessError: ``compiled`` asked for and the compiler failed.
    """
    choice = os.environ.get(env_var, "").lower()
    if choice not in ("", "compiled", "torch"):
        raise ValueError(f"{env_var} must be 'compiled' or 'torch', got {choice!r}")
    if choice == "torch":
        return None
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        if choice == "compiled":
            raise RuntimeError(f"{env_var}=compiled needs a CPU with AVX2 and FMA")
        return None
    try:
        return load(compile_library(source, kernel_cache_dir(), extra_flags))
    except (OSError, subprocess.SubprocessError) as exc:
        if choice == "compiled":
            raise
        detail = getattr(exc, "stderr", b"") or b""
        logger.warning("%s: C kernel unavailable (%s %s); using %s", source.stem, exc,
                       detail.decode(errors="replace")[-500:], fallback)
        return None


class CKernel:
    """One C kernel of ``kernels/``: built, cached and loaded once per process, or its torch fallback.

    Args:
        source: the C file.
        env_var: its override variable (see :func:`load_or_fall_back`).
        load: loads a built library and declares its signatures.
        fallback: what runs instead, for the warning logged when the build fails.
        flags: compiler flags on top of :data:`CFLAGS`.

    ``library()`` is the loaded library or None (decided on first call, ``library.cache_clear()``
    decides again); ``backend()`` says ``"compiled"`` or ``"torch"``; ``build()`` compiles into
    :func:`kernel_cache_dir` now (an image build does this); ``compile(cache_dir, extra_flags)``
    builds a variant elsewhere (the tests build one per instruction-set level). The last two raise
    as :func:`compile_library`.
    """

    def __init__(self, source: Path, env_var: str, load: Callable[[Path], ctypes.CDLL], fallback: str,
                 flags: tuple[str, ...] = ()) -> None:
        self.source, self.env_var, self.load, self.fallback, self.flags = source, env_var, load, fallback, flags
        self.library = functools.lru_cache(maxsize=1)(self._load)

    def _load(self) -> ctypes.CDLL | None:
        return load_or_fall_back(self.source, self.env_var, self.load, self.fallback, self.flags)

    def compile(self, cache_dir: Path, extra_flags: tuple[str, ...] = ()) -> Path:
        return compile_library(self.source, cache_dir, (*self.flags, *extra_flags))

    def build(self) -> Path:
        return self.compile(kernel_cache_dir())

    def backend(self) -> str:
        return "compiled" if self.library() is not None else "torch"
