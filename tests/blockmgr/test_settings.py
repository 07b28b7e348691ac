"""One configuration: every setting of every service and benchmark is one typed field, with one help
text and one environment variable, and the flags are generated from it (blockmgr/settings.py)."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from blockmgr.config import BlockManagerSettings, KeysSettings
from blockmgr.settings import (ENV_PREFIX, SettingsParser, bool_twin, env_name, environment_for, flag_name, load,
                               settings_fields, to_env)
from executor.config import ExecutorSettings
from gateway.settings import GatewaySettings, ServeSettings

ROOT = Path(__file__).resolve().parents[2]
SERVICES = [BlockManagerSettings, KeysSettings, ExecutorSettings, GatewaySettings, ServeSettings]
BENCHMARKS = {"benchmarks.serving.cli": ["ThroughputSettings", "ServeBenchSettings"],
              "benchmarks.blockmgr_bench": ["BlockManagerBenchSettings"],
              "benchmarks.persistence_bench": ["PersistenceBenchSettings"],
              "benchmarks.executor_rss": ["ExecutorRssSettings"],
              "benchmarks.profile_step": ["ProfileStepSettings"],
              "benchmarks.bf16_agreement": ["AgreementSettings"],
              "benchmarks.peers": ["PeersSettings"],
              "benchmarks.kernels_gpu": ["KernelsGpuSettings"]}


def all_settings_classes():
    classes = list(SERVICES)
    for module, names in BENCHMARKS.items():
        classes += [getattr(importlib.import_module(module), name) for name in names]
    return classes


@pytest.fixture(autouse=True)
def _no_settings_from_this_shell(monkeypatch):
    import os

    for var in [v for v in os.environ if v.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(var)


@pytest.mark.parametrize("cls", all_settings_classes(), ids=lambda c: c.__name__)
def test_every_field_has_help_a_variable_and_a_flag(cls):
    fields = settings_fields(cls)
    assert fields
    for name, info in fields.items():
        assert info.description, f"{cls.__name__}.{name} has no help text"
        assert env_name(cls, name).startswith(ENV_PREFIX), name
        assert flag_name(cls, name).startswith("--"), name
    # One variable and one flag per field.
    assert len({env_name(cls, n) for n in fields}) == len(fields)
    assert len({flag_name(cls, n) for n in fields}) == len(fields)


def test_compose_names_are_the_variables():
    assert env_name(ExecutorSettings, "swap_space") == "PAGEDSERVE_SWAP_SPACE_GIB"
    assert env_name(ExecutorSettings, "bind") == "PAGEDSERVE_EXECUTOR_BIND"
    assert env_name(BlockManagerSettings, "bind") == "PAGEDSERVE_BLOCKMGR_BIND"
    assert env_name(ExecutorSettings, "blockmgr") == env_name(GatewaySettings, "blockmgr") == "PAGEDSERVE_BLOCKMGR_ADDR"
    assert env_name(GatewaySettings, "executors") == "PAGEDSERVE_EXECUTOR_ADDRS"
    assert env_name(GatewaySettings, "api_keys") == "PAGEDSERVE_API_KEY"
    assert env_name(KeysSettings, "key_names") == "PAGEDSERVE_KEY_NAMES"


def test_shared_settings_are_defined_once():
    # The executors' and the gateway's model, block-manager address, keys and log level are one
    # inherited definition each (same type, default, help and variable), not copies that could drift.
    for name in ("model", "max_model_len", "blockmgr", "keys_dir", "log_level", "insecure_local"):
        assert repr(ExecutorSettings.model_fields[name]) == repr(GatewaySettings.model_fields[name]), name
    for name in ("max_message_bytes", "keys_dir", "log_level"):
        assert repr(ExecutorSettings.model_fields[name]) == repr(BlockManagerSettings.model_fields[name]), name
    assert "block_size" not in GatewaySettings.model_fields  # the executor owns it


def test_environment_and_flags_both_set_a_field_and_flags_win(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_BLOCK_SIZE", "32")
    monkeypatch.setenv("PAGEDSERVE_SWAP_SPACE_GIB", "2")
    monkeypatch.setenv("PAGEDSERVE_EXECUTOR_ADDRS", "executor-0@tcp://a:1 executor-1@tcp://b:2")
    settings, _ = load(ExecutorSettings, [], "x", "x")
    assert settings.block_size == 32 and settings.swap_space == 2.0
    settings, _ = load(ExecutorSettings, ["--block-size", "8", "--swap-space", "0.25"], "x", "x")
    assert settings.block_size == 8 and settings.swap_space == 0.25
    gateway, _ = load(GatewaySettings, [], "x", "x")
    assert gateway.executors == ["executor-0@tcp://a:1", "executor-1@tcp://b:2"]
    gateway, _ = load(GatewaySettings, ["--executor", "e@tcp://c:3", "--shared-prefix-cache"], "x", "x")
    assert gateway.executors == ["e@tcp://c:3"] and gateway.isolate_tenants is False
    monkeypatch.setenv("PAGEDSERVE_PREFIX_CACHING", "false")
    assert load(BlockManagerSettings, [], "x", "x")[0].prefix_caching is False


@pytest.mark.parametrize("argv, flag", [
    (["--block-size", "0"], "--block-size"),
    (["--block-size", "sixteen"], "--block-size"),
    (["--swap-space", "-1"], "--swap-space"),
    (["--executor-id", "gateway"], "--executor-id"),
    (["--dtype", "int8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--log-level", "LOUD"], "--log-level"),
])
def test_a_bad_value_exits_2_naming_its_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        load(ExecutorSettings, argv, "pagedserve executor", "x")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag}: " in err, err


def test_a_setting_with_its_own_variable_is_read_under_that_name_only(monkeypatch):
    from executor.config import ExecutorSettings

    monkeypatch.setenv("PAGEDSERVE_SWAP_SPACE", "0.1")  # the field's name; its variable is ..._GIB
    monkeypatch.setenv("PAGEDSERVE_BIND", "tcp://0.0.0.0:7777")  # ..._EXECUTOR_BIND / ..._BLOCKMGR_BIND
    assert ExecutorSettings().swap_space == 0.5 and ExecutorSettings().bind == "tcp://127.0.0.1:5560"
    monkeypatch.setenv("PAGEDSERVE_SWAP_SPACE_GIB", "0.25")
    assert ExecutorSettings().swap_space == 0.25
    assert ExecutorSettings(swap_space=2).swap_space == 2  # by field name in code still works


@pytest.mark.parametrize("argv", [["--block-size", "0"], ["--no-such-flag"]])
def test_an_error_is_one_line_and_a_pointer_to_help_not_the_whole_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        load(ExecutorSettings, argv, "pagedserve executor", "x")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage:" not in err, err
    assert err.splitlines() == [err.splitlines()[0], "(`pagedserve executor --help` lists the flags)"], err
    assert err.startswith("pagedserve executor: error: "), err


def test_a_bad_variable_exits_2_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("PAGEDSERVE_WATERMARK", "2")
    with pytest.raises(SystemExit) as exc:
        load(BlockManagerSettings, [], "pagedserve blockmgr", "x")
    assert exc.value.code == 2 and "$PAGEDSERVE_WATERMARK: " in capsys.readouterr().err


def test_to_env_rebuilds_the_same_settings(monkeypatch):
    """How serve hands a child its settings: variables that rebuild the object exactly."""
    parser = SettingsParser("x", "x")
    for cls in (BlockManagerSettings, ExecutorSettings, GatewaySettings):
        parser.add(cls)
    given = parser.parse(["--no-prefix-caching", "--eviction", "lfu", "--block-size", "8", "--swap-space", "0.1",
                          "--api-key", "a", "--api-key", "b", "--executor", "e0@tcp://x:1", "--executor", "e1@tcp://y:2",
                          "--min-temperature", "0.001", "--device", "cpu", "--insecure-local"])
    for cls in (BlockManagerSettings, ExecutorSettings, GatewaySettings):
        settings = parser.build(cls, given)
        env = to_env(settings)
        assert all(k.startswith(ENV_PREFIX) and isinstance(v, str) for k, v in env.items())
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        assert cls() == settings


def test_a_child_environment_replaces_every_variable_of_its_settings():
    settings = ExecutorSettings(block_size=8)
    base = {"PAGEDSERVE_NUM_BLOCKS": "7", "PAGEDSERVE_DEVICE": "cuda", "PAGEDSERVE_CACHE_DIR": "/c", "PATH": "/bin"}
    env = environment_for(settings, base)
    assert env["PAGEDSERVE_BLOCK_SIZE"] == "8" and env["PAGEDSERVE_NUM_BLOCKS"] == "0"
    assert "PAGEDSERVE_DEVICE" not in env  # None in the object: not inherited from serve's shell
    assert env["PAGEDSERVE_CACHE_DIR"] == "/c" and env["PATH"] == "/bin"  # not settings: passed through


def test_every_service_help_lists_every_setting_once():
    for module, cls in (("blockmgr", BlockManagerSettings), ("executor", ExecutorSettings),
                        ("gateway", GatewaySettings)):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
        assert out.returncode == 0, out.stderr
        for name in settings_fields(cls):
            flag, var = flag_name(cls, name), env_name(cls, name)
            assert sum(out.stdout.count(f"  {flag}{end}") for end in " \n,") == 1, (module, flag)
            if cls.model_fields[name].annotation is bool:  # its twin on the same entry
                assert out.stdout.count(f"  {flag}, {bool_twin(flag)}") == 1, (module, flag)
            assert out.stdout.count(f"[${var}") == 1, (module, var)


def test_keys_command_reads_its_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_KEYS_DIR", str(tmp_path / "k"))
    monkeypatch.setenv("PAGEDSERVE_KEY_NAMES", "blockmgr executor-3")
    settings, _ = load(KeysSettings, [], "pagedserve keys", "x")
    assert settings.keys_dir == str(tmp_path / "k") and settings.key_names == ["blockmgr", "executor-3"]
    with pytest.raises(SystemExit) as exc:
        load(KeysSettings, ["--name", "../evil"], "pagedserve keys", "x")
    assert exc.value.code == 2


def test_argparse_is_used_by_the_settings_machinery_alone():
    """No hand-written flags: argparse's flag call appears in blockmgr/settings.py and nowhere else."""
    call = "add_" + "argument"  # spelled in two parts so that this file does not match
    out = subprocess.run(["git", "grep", "-l", call], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode in (0, 1), out.stderr
    assert set(out.stdout.split()) == {"blockmgr/settings.py"}


@pytest.mark.parametrize("cls, name, on, off", [
    (BlockManagerSettings, "prefix_caching", "--prefix-caching", "--no-prefix-caching"),
    (ExecutorSettings, "async_scheduling", "--async-scheduling", "--no-async-scheduling"),
])
def test_a_bool_flag_in_either_form_wins_over_its_variable(monkeypatch, cls, name, on, off):
    var = env_name(cls, name)
    monkeypatch.setenv(var, "false")
    assert getattr(load(cls, [on], "x", "x")[0], name) is True
    monkeypatch.setenv(var, "true")
    assert getattr(load(cls, [off], "x", "x")[0], name) is False
    assert getattr(load(cls, [off, on], "x", "x")[0], name) is True  # the last one given wins
