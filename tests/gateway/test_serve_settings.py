"""`pagedserve serve`'s settings: every service's flags once, in one section per service, and each
child's settings derived from the same objects (handed over as PAGEDSERVE_ variables)."""

import logging
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from blockmgr.config import BlockManagerSettings
from blockmgr.settings import ENV_PREFIX, flag_name, settings_fields, to_env
from executor.config import ExecutorSettings, ModelSettings
from gateway.settings import GatewaySettings, ServeSettings, parse_serve


@pytest.fixture(autouse=True)
def _no_settings_from_this_shell(monkeypatch):
    for var in [v for v in os.environ if v.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(var)


def _help_sections(capsys) -> dict[str, list[str]]:
    with pytest.raises(SystemExit) as exc:
        parse_serve(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    sections, current = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif current is not None and (m := re.match(r"  (--[a-z0-9-]+)", line)):
            current.append(m.group(1))
    return sections


def test_serve_help_groups_flags_by_service_each_once(capsys):
    sections = _help_sections(capsys)
    titles = list(sections)
    assert titles == ["options", "serve (and every service: log level, keys)", "model (executors and gateway)",
                      "block manager", "each executor", "gateway"]
    flags = [f for fs in sections.values() for f in fs]
    assert len(flags) == len(set(flags)), [f for f in flags if flags.count(f) > 1]
    assert {"--block-size", "--num-threads", "--swap-space", "--kv-cache-gib"} <= set(sections["each executor"])
    assert {"--no-prefix-caching", "--eviction", "--redis-url"} <= set(sections["block manager"])
    assert {"--api-key", "--port", "--max-waiting-sequences"} <= set(sections["gateway"])
    assert {"--model", "--max-model-len"} == set(sections["model (executors and gateway)"])
    # Every setting of every service is offered, except what serve places itself.
    for key, cls in (("blockmgr", BlockManagerSettings), ("executor", ExecutorSettings), ("gateway", GatewaySettings)):
        for name in settings_fields(cls):
            flag = flag_name(cls, name)
            assert (flag in flags) != (name in ServeSettings.PLACED[key]), (cls.__name__, flag)


def test_children_get_their_settings_from_the_same_objects(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "k1,k2")
    settings, _ = parse_serve(["--num-executors", "2", "--blockmgr-port", "6001", "--executor-base-port", "6010",
                               "--block-size", "8", "--no-prefix-caching", "--log-level", "debug",
                               "--keys-dir", "/tmp/k", "--max-model-len", "512", "--max-stop-strings", "7",
                               "--served-model-name", "m"])
    procs = settings.processes("/models/smol", num_threads=3)
    assert [(name, module) for name, module, _ in procs] == [
        ("blockmgr", "blockmgr"), ("executor-0", "executor"), ("executor-1", "executor"), ("gateway", "gateway")]
    (_, _, bm), (_, _, ex0), (_, _, ex1), (_, _, gw) = procs
    assert isinstance(bm, BlockManagerSettings) and bm.bind == "tcp://127.0.0.1:6001" and not bm.prefix_caching
    assert [ex.bind for ex in (ex0, ex1)] == ["tcp://127.0.0.1:6010", "tcp://127.0.0.1:6011"]
    assert [ex.executor_id for ex in (ex0, ex1)] == ["executor-0", "executor-1"]
    for ex in (ex0, ex1):
        assert ex.blockmgr == bm.bind and ex.block_size == 8 and ex.num_threads == 3
        assert ex.model == "/models/smol" and ex.max_model_len == 512
    assert gw.executors == ["executor-0@tcp://127.0.0.1:6010", "executor-1@tcp://127.0.0.1:6011"]
    assert gw.blockmgr == bm.bind and gw.model == "/models/smol" and gw.served_model_name == "m"
    assert gw.api_keys == ["k1", "k2"] and gw.max_stop_strings == 7 and gw.max_model_len == 512
    for child in (bm, ex0, ex1, gw):
        assert child.log_level == "DEBUG" and child.keys_dir == "/tmp/k" and child.insecure_local is False
    # What the child process receives, and rebuilds its settings from.
    env = to_env(gw)
    assert env["PAGEDSERVE_EXECUTOR_ADDRS"] == " ".join(gw.executors) and env["PAGEDSERVE_API_KEY"] == "k1,k2"
    assert "PAGEDSERVE_API_KEY" not in to_env(ex0) and "PAGEDSERVE_BLOCK_SIZE" not in env
    for var in [v for v in os.environ if v.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(var)
    for var, value in to_env(ex1).items():
        monkeypatch.setenv(var, value)
    assert ExecutorSettings() == ex1


def test_one_default_for_threads_and_model():
    settings, _ = parse_serve([])
    # None: the usable cores split among the executors (serve), all of them for one (`executor`).
    assert settings.executor.num_threads is None and ExecutorSettings().num_threads is None
    assert settings.executor.model is None and settings.gateway.model is None
    assert repr(ModelSettings.model_fields["model"]) == repr(GatewaySettings.model_fields["model"])


@pytest.mark.parametrize("argv, flag", [(["--num-executors", "0"], "--num-executors"),
                                        (["--port", "70000"], "--port"),
                                        (["--block-size", "-4"], "--block-size"),
                                        (["--pin-share", "2"], "--pin-share"),
                                        (["--max-abs-priority", "-1"], "--max-abs-priority")])
def test_serve_refuses_a_bad_value_naming_its_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_serve(argv)
    assert exc.value.code == 2
    assert f"error: {flag}: " in capsys.readouterr().err


@pytest.mark.parametrize("gguf,name", [("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
                                       ("Llama-3-8B.Q4_K_M.gguf", "Llama-3-8B"), ("Mistral-7B.IQ3_XS.gguf", "Mistral-7B"),
                                       ("qwen2-0_5b-instruct-fp16.gguf", "qwen2-0_5b-instruct"),
                                       ("model-F32.gguf", "model"), ("plain.gguf", "plain")])
def test_the_default_served_name_is_the_models_whoever_starts_the_gateway(tmp_path, gguf, name):
    import json

    from gateway.settings import default_served_name

    assert default_served_name(tmp_path) == tmp_path.name  # a Hugging Face directory
    (tmp_path / "pagedserve-source.json").write_text(json.dumps({"name": gguf}))
    assert default_served_name(tmp_path) == name


def test_serve_warns_of_executor_keys_it_does_not_run(tmp_path, smollm_dir, monkeypatch, caplog, free_port):
    """Keys left by an earlier stack with more executors stay trusted; serve names them and how
    to drop them."""
    import gateway.launcher
    from blockmgr import security
    from gateway.cli import serve

    keys_dir = tmp_path / "keys"
    security.create_keys(keys_dir, ["blockmgr", "gateway", "executor-0", "executor-1", "executor-10", "kv-reader"])
    started = []
    monkeypatch.setattr(gateway.launcher, "supervise", lambda children: started.extend(children) or 0)
    with caplog.at_level(logging.WARNING, logger="pagedserve"):
        assert serve(["--keys-dir", str(keys_dir), "--model", str(smollm_dir), "--port", str(free_port()),
                      "--blockmgr-port", str(free_port()), "--executor-base-port", str(free_port())]) == 0
    assert started  # the stack would have started: a warning, not a refusal
    warnings = [r.getMessage() for r in caplog.records if "does not run" in r.getMessage()]
    assert warnings == [f"{keys_dir} trusts the keys of executor-1, executor-10, which this stack does not run "
                        f"(left by a stack with more executors?); if nothing of yours uses them, delete "
                        f"{keys_dir / 'executor-1.key'} {keys_dir / 'executor-1.key_secret'} "
                        f"{keys_dir / 'executor-10.key'} {keys_dir / 'executor-10.key_secret'}: a service re-reads the "
                        f"directory at each new connection"]


def test_serve_hands_a_bool_flags_positive_form_over_its_variable(smollm_dir, monkeypatch, free_port):
    """``--prefix-caching`` given to serve reaches the child even where serve's shell turned it off."""
    import gateway.launcher
    from gateway.cli import serve

    monkeypatch.setenv("PAGEDSERVE_PREFIX_CACHING", "false")
    monkeypatch.setenv("PAGEDSERVE_ASYNC_SCHEDULING", "false")
    started = []
    monkeypatch.setattr(gateway.launcher, "supervise", lambda children: started.extend(children) or 0)
    assert serve(["--insecure-local", "--model", str(smollm_dir), "--port", str(free_port()),
                  "--blockmgr-port", str(free_port()), "--executor-base-port", str(free_port()),
                  "--prefix-caching", "--async-scheduling"]) == 0
    env = {child.name: child.env for child in started}
    assert env["blockmgr"]["PAGEDSERVE_PREFIX_CACHING"] == "true"
    assert env["executor-0"]["PAGEDSERVE_ASYNC_SCHEDULING"] == "true"


def test_make_serve_runs_a_second_stack_as_the_readme_says():
    """`make serve PORT=... SERVE_ARGS="..."`: the README's example reaches `pagedserve serve`, and
    moves every port a second stack on this machine would otherwise share with the first."""
    root = Path(__file__).resolve().parents[2]
    example = re.search(r"`(make serve PORT=\d+ SERVE_ARGS=\"[^\"]+\")`", (root / "README.md").read_text())
    assert example, "README shows no second stack through make serve"
    out = subprocess.run([*shlex.split(example.group(1)), "-n"], capture_output=True, text=True, cwd=root,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    command = next(shlex.split(line) for line in out.stdout.splitlines() if " serve " in line)
    assert command[:2] == [".venv/bin/pagedserve", "serve"], command
    settings, _ = parse_serve(command[2:])
    default, _ = parse_serve([])
    assert settings.gateway.port != default.gateway.port
    assert settings.blockmgr_port != default.blockmgr_port
    assert settings.executor_base_port != default.executor_base_port
