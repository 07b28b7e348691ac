"""The base of every benchmark's settings: flags and ``PAGEDSERVE_BENCH_*`` variables.

Benchmarks declare their own knobs here and reuse the services' settings (block size, model,
threads ...) with :func:`blockmgr.settings.reuse`: one help text and one definition each. Their
variables carry their own prefix so that a shell set up for ``pagedserve serve`` does not steer a
benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from blockmgr.settings import SETTINGS_CONFIG

BENCH_ENV_PREFIX = "PAGEDSERVE_BENCH_"


class BenchmarkSettings(BaseSettings):
    """A benchmark's settings (subclass it; fields with :func:`blockmgr.settings.setting` or ``reuse``)."""

    model_config = SettingsConfigDict(env_prefix=BENCH_ENV_PREFIX, **SETTINGS_CONFIG)


# pagedserve's packages, which a benchmark with ``--repo`` imports from another checkout.
PACKAGES = ("blockmgr", "executor", "gateway", "kernels")


def import_from(repo: str | Path) -> None:
    """Make later imports of pagedserve's packages come from the checkout ``repo``.

    A benchmark parses its settings with this checkout's classes; the packages imported for that
    are dropped from ``sys.modules`` so that the code it then imports and measures is ``repo``'s.
    """
    sys.path.insert(0, str(Path(repo).resolve()))
    for name in list(sys.modules):
        if name.split(".")[0] in PACKAGES:
            del sys.modules[name]
