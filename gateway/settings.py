"""The gateway's settings (``pagedserve gateway``), and ``pagedserve serve``'s, which nest every service's.

Each field is one flag and one environment variable (see :mod:`blockmgr.settings`). Imports
neither torch nor the executor's model code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, PrivateAttr

from blockmgr.config import BlockManagerAddress, BlockManagerSettings
from blockmgr.settings import CommaList, ServiceSettings, SettingsParser, SpaceList, setting
from executor.config import ExecutorSettings, ModelSettings


class GatewaySettings(ServiceSettings, ModelSettings, BlockManagerAddress):
    """Where the gateway finds its model files and the other processes, and its limits.

    ``model`` must be a converted Hugging Face directory (tokenizer files + config.json).
    ``served_model_name`` and ``max_model_len`` are filled in from it by ``pagedserve gateway``
    when unset. The request limits (``max_sequences_per_request`` ... ``max_waiting_sequences``)
    are enforced by :mod:`gateway.limits`. ``keys`` (not a setting) is the gateway's CURVE keys
    (:class:`blockmgr.security.Keys`), None for an ``--insecure-local`` stack; see :meth:`with_keys`.
    """

    version: ClassVar[str] = "0.1.0"  # reported by /version

    served_model_name: str | None = setting(None, "the model name clients send (default: the model's name: a "
                                                  "converted GGUF file's name without its quantization suffix, "
                                                  "else the model directory's name)")
    executors: SpaceList = setting(help="an executor's ZeroMQ address, prefixed by its executor id whose key to "
                                        "expect: executor-0@tcp://127.0.0.1:5560 (the variable: space-separated)",
                                   flag="--executor", env="PAGEDSERVE_EXECUTOR_ADDRS", default_factory=list)
    host: str = setting("127.0.0.1", "address the HTTP API listens on")
    port: int = setting(8000, "port the HTTP API listens on", ge=1, le=65535)
    api_keys: CommaList = setting(help="require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize; each key "
                                       "is a tenant (the variable: comma-separated; unset: open)",
                                  flag="--api-key", env="PAGEDSERVE_API_KEY", default_factory=list)
    admin_key: str | None = setting(None, "bearer token for /admin/* (unset: loopback clients only)")
    metrics_need_admin: bool = setting(False, "guard /metrics like /admin/* (admin key, or loopback without one)")
    isolate_tenants: bool = setting(True, "with API keys: let tenants share prefix-cache entries (default: each "
                                          "key's are salted, so no tenant sees what another sent)",
                                    flag="--shared-prefix-cache")
    max_body_bytes: int = setting(8 * 2**20, "refuse request bodies over this size with 413, bytes", ge=1024)
    max_sequences_per_request: int = setting(256, "most sequences (prompts x n, or x beams) in one request", ge=0)
    max_waiting_sequences: int = setting(1024, "answer 429 + Retry-After when this many sequences wait for their "
                                               "first token (0: no limit)", ge=0,
                                         old_flags=("--max-waiting-requests",))
    max_stop_strings: int = setting(4, "most stop strings per request", ge=0)
    max_stop_string_chars: int = setting(256, "longest stop string, in characters", ge=0)
    max_abs_priority: int = setting(1000, "priority must be in [-N, N]", ge=0)
    min_temperature: float = setting(1e-5, "temperatures below this (and above 0) are treated as greedy", ge=0)
    max_logit_bias_entries: int = setting(300, "most logit_bias entries per request", ge=0)
    health_interval_s: float = setting(1.0, "how often the gateway polls each executor's info, seconds", gt=0)
    executor_timeout_s: float = setting(10.0, "an executor connected but reporting no progress (no output, no probe "
                                              "reply) this long while it has requests in flight (a hung step loop) is "
                                              "declared dead and its requests resume elsewhere; stretched to twice its "
                                              "longest recent step, seconds", gt=0)
    request_timeout_s: float = setting(600.0, "deadline of each request from its arrival, seconds: past it the "
                                              "request ends with an error and frees its blocks",
                                       flag="--request-timeout", gt=0)

    _keys: Any = PrivateAttr(default=None)

    @property
    def keys(self) -> Any:
        """The gateway's CURVE keys for its ZeroMQ connections; None: plain ZeroMQ."""
        return self._keys

    def with_keys(self, keys: Any) -> GatewaySettings:
        """These settings with the gateway's CURVE keys attached (``blockmgr.security.Keys`` or None)."""
        out = self.model_copy()
        out._keys = keys
        return out


class ServeSettings(ServiceSettings):
    """``pagedserve serve``: the whole stack on this machine, one settings object per process.

    ``blockmgr``, ``executor`` and ``gateway`` hold the services' settings as given (flags, then
    ``PAGEDSERVE_*`` variables, then defaults); ``executor`` is the template of every executor.
    :meth:`processes` derives each child's own settings from them, placing each service on its
    loopback address. Shared settings (log level, keys, model, block-manager address) are set on
    every child from one value.
    """

    # The services' fields that serve places itself: not offered as serve flags.
    PLACED: ClassVar[dict[str, set[str]]] = {
        "blockmgr": {"bind"},
        "executor": {"bind", "executor_id", "blockmgr"},
        "gateway": {"executors", "blockmgr"},
    }

    num_executors: int = setting(1, "executor processes on this machine", ge=1)
    blockmgr_port: int = setting(5557, "loopback port of the block manager", ge=1, le=65535)
    executor_base_port: int = setting(5560, "executor i binds this loopback port + i", ge=1, le=65535)
    blockmgr: BlockManagerSettings = Field(default_factory=BlockManagerSettings, exclude=True)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings, exclude=True)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings, exclude=True)

    def processes(self, model_dir: str, num_threads: int) -> list[tuple[str, str, ServiceSettings]]:
        """Each child's ``(name, module, settings)``, in start order: block manager, executors, gateway.

        Args:
            model_dir: the converted model directory, for the executors and the gateway.
            num_threads: torch threads of each executor.
        """
        shared = {"log_level": self.log_level, "keys_dir": self.keys_dir, "insecure_local": self.insecure_local}
        address = f"tcp://127.0.0.1:{self.blockmgr_port}"
        out: list[tuple[str, str, ServiceSettings]] = [
            ("blockmgr", "blockmgr", self.blockmgr.model_copy(update={**shared, "bind": address}))]
        names = []
        for i in range(self.num_executors):
            name, bind = f"executor-{i}", f"tcp://127.0.0.1:{self.executor_base_port + i}"
            names.append(f"{name}@{bind}")
            out.append((name, "executor", self.executor.model_copy(update={
                **shared, "bind": bind, "executor_id": name, "blockmgr": address, "model": model_dir,
                "num_threads": num_threads})))
        served = self.gateway.served_model_name or default_served_name(Path(model_dir))
        out.append(("gateway", "gateway", self.gateway.model_copy(update={
            **shared, "executors": names, "blockmgr": address, "model": model_dir, "served_model_name": served})))
        return out


def default_served_name(model_dir: Path) -> str:
    """The model name clients send when ``--served-model-name`` is not given.

    For a directory converted from a GGUF file (it holds ``pagedserve-source.json``, see
    ``executor.gguf_convert``): the file's name without ``.gguf`` and without a quantization
    suffix (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``); else the
    directory's name. ``pagedserve serve`` and ``pagedserve gateway`` both use it, so the same
    model has the same name however it is started.
    """
    source = model_dir / "pagedserve-source.json"
    try:
        name = str(json.loads(source.read_text())["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return model_dir.name
    stem = name.removesuffix(".gguf")
    return re.sub(r"[.-](?:[QqIi]Q?\d\w*|[Ff][Pp]?(?:16|32)|[Bb][Ff]16)$", "", stem) or stem


def parse_serve(argv: list[str] | None) -> tuple[ServeSettings, SettingsParser]:
    """``pagedserve serve``'s flags, one section per service, each setting once. Returns (settings, parser)."""
    parser = SettingsParser("pagedserve serve", "Start the whole stack on this machine: the block manager, the "
                                                "executors and the gateway, each its own process.")
    parser.add(ServeSettings, "serve (and every service: log level, keys)")
    parser.add(ModelSettings, "model (executors and gateway)")
    sections = (("blockmgr", BlockManagerSettings, "block manager"), ("executor", ExecutorSettings, "each executor"),
                ("gateway", GatewaySettings, "gateway"))
    for key, cls, title in sections:
        parser.add(cls, title, skip=ServeSettings.PLACED[key])
    given = parser.parse(argv)
    services = {key: parser.build(cls, given) for key, cls, _ in sections}
    return parser.build(ServeSettings, given, **services), parser
