"""Each service says at start-up whether its ZeroMQ links are CURVE-authenticated, and where its
keys come from (every service gets its keys through ``security.keys_for``)."""

import logging
from types import SimpleNamespace

from blockmgr import security


def _lines(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "pagedserve.security"]


def test_keys_from_a_directory_are_logged_with_the_directory(tmp_path, caplog):
    keys_dir = tmp_path / "keys"
    security.create_keys(keys_dir, ["blockmgr", "gateway", "executor-0"])
    with caplog.at_level(logging.INFO, logger="pagedserve.security"):
        keys = security.keys_for(SimpleNamespace(keys_dir=str(keys_dir), insecure_local=False), "gateway")
    assert keys is not None and keys.name == "gateway"
    assert _lines(caplog) == [(logging.INFO, f"gateway: ZeroMQ links CURVE-authenticated and encrypted; keys from "
                                             f"{keys_dir} (--keys-dir / $PAGEDSERVE_KEYS_DIR): 3 trusted public keys")]


def test_insecure_local_is_a_warning(caplog):
    with caplog.at_level(logging.INFO, logger="pagedserve.security"):
        keys = security.keys_for(SimpleNamespace(keys_dir=None, insecure_local=True), "blockmgr",
                                 ["tcp://127.0.0.1:5555"])
    assert keys is None
    assert _lines(caplog) == [(logging.WARNING, "blockmgr: ZeroMQ links run WITHOUT authentication or encryption "
                                                "(--insecure-local)")]
