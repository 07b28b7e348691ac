"""The block manager's settings (``pagedserve blockmgr``), and the settings other services take from it.

Each field is one flag and one environment variable (see :mod:`blockmgr.settings`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, field_validator

from blockmgr.security import BLOCKMGR, GATEWAY, MAX_MESSAGE_BYTES, check_name
from blockmgr.settings import KeysDirSettings, ServiceSettings, SpaceList, setting


class ZmqServiceSettings(ServiceSettings):
    """A service that binds a ZeroMQ socket (the block manager, an executor)."""

    max_message_bytes: int = setting(MAX_MESSAGE_BYTES, "drop ZeroMQ messages longer than this, bytes (block manager and executors)", ge=1024)


class BlockManagerAddress(BaseModel):
    """Where the block manager listens, for the services that connect to it (executors, gateway)."""

    blockmgr: str = setting("tcp://127.0.0.1:5557", "the block manager's ZeroMQ address", env="PAGEDSERVE_BLOCKMGR_ADDR")


class BlockManagerSettings(ZmqServiceSettings):
    """``pagedserve blockmgr``: the KV-memory authority (see :class:`blockmgr.manager.BlockManager`)."""

    bind: str = setting("tcp://127.0.0.1:5557", "ZeroMQ address the block manager binds", env="PAGEDSERVE_BLOCKMGR_BIND")
    kv_events_bind: str | None = setting(None, "ZeroMQ PUB address for KV events (unset: off)")
    redis_url: str | None = setting(None, "keep the block manager's state in Redis, e.g. redis://127.0.0.1:6379/0 "
                                          "(unset: in memory only)")
    redis_compact_every: int = setting(10_000, "most step-log records per executor before a full snapshot replaces "
                                               "them; a log as large as its snapshot is compacted sooner", ge=1)
    prefix_caching: bool = setting(True, "turn the prefix cache off", flag="--no-prefix-caching")
    watermark: float = setting(0.01, "fraction of device blocks kept free at admission", ge=0, lt=1)
    eviction: Literal["lru", "lfu", "priority"] = setting("lru", "which cached KV block is reused first")
    pin_share: float = setting(0.5, "most of each device KV pool that pins may hold", ge=0, le=1)


class KeysSettings(KeysDirSettings):
    """``pagedserve keys``: create the CURVE key pairs of a stack (see :mod:`blockmgr.security`)."""

    key_names: SpaceList = setting(help="a principal to create keys for: blockmgr, gateway or an executor id",
                                   flag="--name", default_factory=lambda: [BLOCKMGR, GATEWAY, "executor-0"])

    @field_validator("key_names")
    @classmethod
    def _valid_names(cls, names: list[str]) -> list[str]:
        for name in names:
            check_name(name)
        return names
