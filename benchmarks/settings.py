"""The base of every benchmark's settings: flags and ``PAGEDSERVE_BENCH_*`` variables.

Benchmarks declare their own knobs here and reuse the services' settings (block size, model,
threads ...) with :func:`blockmgr.settings.reuse`: one help text and one definition each. Their
variables carry their own prefix so that a shell set up for ``pagedserve serve`` does not steer a
benchmark.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from blockmgr.settings import SETTINGS_CONFIG

BENCH_ENV_PREFIX = "PAGEDSERVE_BENCH_"


class BenchmarkSettings(BaseSettings):
    """A benchmark's settings (subclass it; fields with :func:`blockmgr.settings.setting` or ``reuse``)."""

    model_config = SettingsConfigDict(env_prefix=BENCH_ENV_PREFIX, **SETTINGS_CONFIG)
