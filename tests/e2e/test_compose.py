"""compose.yaml, proven without Docker: its services' own commands, environments and healthchecks.

The test reads compose.yaml, picks the services of the ``cpu`` profile, points their address
variables at loopback ports, and starts each service's command as a local process (Redis too, from
a real ``redis-server``) in ``depends_on`` order, waiting for each one's own healthcheck to pass
before starting the services that depend on it. Then it asks for a chat completion through the
gateway and checks that the block manager keeps its state in that Redis.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from blockmgr.config import BlockManagerSettings, KeysSettings
from blockmgr.settings import ENV_PREFIX, env_name, settings_fields
from executor.config import ExecutorSettings
from gateway.settings import GatewaySettings
from tests.conftest import _free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ``$$`` is a literal ``$``; ``${VAR}`` / ``${VAR:-default}`` from ``env``."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default

    return re.sub(r"\$\$|\$\{(\w+)(:-([^}]*))?\}", sub, value)


def active_services(compose: dict, profile: str) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items()
            if not svc.get("profiles") or profile in svc["profiles"]}


def start_order(services: dict[str, dict]) -> list[str]:
    order: list[str] = []

    def visit(name: str, path: tuple = ()) -> None:
        assert name not in path, f"depends_on cycle: {path + (name,)}"
        if name in order:
            return
        for dep, spec in (services[name].get("depends_on") or {}).items():
            if dep in services:
                visit(dep, path + (name,))
            else:
                assert isinstance(spec, dict) and spec.get("required") is False, (
                    f"{name} depends on {dep}, which is not in this profile and not optional")
        order.append(name)

    for name in services:
        visit(name)
    return order


def argv_of(command, env: dict[str, str]) -> list[str]:
    if isinstance(command, str):
        return ["sh", "-c", interpolate(command, env)]
    return [interpolate(str(part), env) for part in command]


def healthcheck_argv(test, env: dict[str, str]) -> list[str]:
    if isinstance(test, str):
        return ["sh", "-c", interpolate(test, env)]
    kind, *rest = test
    rest = [interpolate(str(x), env) for x in rest]
    if kind == "CMD":
        return rest
    assert kind == "CMD-SHELL", test
    return ["sh", "-c", rest[0]]


def svc_env(svc: dict) -> dict:
    return {k: str(v) for k, v in (svc.get("environment") or {}).items() if k.startswith(ENV_PREFIX)}


def env_names(cls) -> set[str]:
    return {env_name(cls, name) for name in settings_fields(cls)}


# The settings classes each service's command reads (the block manager's also runs `pagedserve keys`).
SETTINGS_OF = {"blockmgr": (BlockManagerSettings, KeysSettings), "executor": (ExecutorSettings,),
               "executor-cpu": (ExecutorSettings,), "gateway": (GatewaySettings,)}


def test_compose_file_declares_the_stack(compose):
    services = compose["services"]
    assert {"redis", "blockmgr", "executor", "executor-cpu", "gateway"} <= set(services)
    gpu = services["executor"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["PAGEDSERVE_DEVICE"] == "cuda"
    assert services["executor-cpu"]["profiles"] == ["cpu"]
    assert services["executor-cpu"]["environment"]["PAGEDSERVE_DEVICE"] == "cpu"
    assert "executor" in services["executor-cpu"]["networks"]["default"]["aliases"]
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        if name != "redis":
            assert svc["build"] == "." and "pagedserve " in " ".join(svc["command"]), name
    assert (ROOT / "Dockerfile").is_file()
    # Only the HTTP API is published; the ZeroMQ services authenticate with the keys volume.
    assert [name for name, svc in services.items() if svc.get("ports")] == ["gateway"]
    for name in ("blockmgr", "executor", "executor-cpu", "gateway"):
        assert svc_env(services[name])["PAGEDSERVE_KEYS_DIR"] == "/keys", name
        assert "keys:/keys" in services[name]["volumes"], name
    # Each service reads its settings from its environment alone: every PAGEDSERVE_ variable set
    # is one of its settings (a typo would be silently ignored) and is documented at the top.
    header = (ROOT / "compose.yaml").read_text().split("\nname:")[0]
    for name, svc in services.items():
        if name == "redis":
            continue
        assert not re.search(r"\$\$\{?\w", " ".join(map(str, svc["command"]))), f"{name} builds flags from variables"
        known = set().union(*(env_names(cls) for cls in SETTINGS_OF[name]))
        for var in svc_env(svc):
            assert var in known, f"{name}: {var} is none of its settings"
            assert var in header, f"{var} is not documented in compose.yaml's header"


def test_cpu_profile_runs_as_local_processes(compose, smollm_dir, tmp_path):
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
    services = active_services(compose, "cpu")
    assert set(services) == {"redis", "blockmgr", "executor-cpu", "gateway"}
    ports = {name: _free_port() for name in ("redis", "blockmgr", "executor", "gateway")}
    loop = "127.0.0.1"
    # Loopback stand-ins for the compose network's names and the image's paths.
    overrides = {
        "redis": {"REDIS_PORT": str(ports["redis"]), "REDIS_DIR": str(tmp_path)},
        "blockmgr": {"PAGEDSERVE_BLOCKMGR_BIND": f"tcp://{loop}:{ports['blockmgr']}",
                     "PAGEDSERVE_REDIS_URL": f"redis://{loop}:{ports['redis']}/0"},
        "executor-cpu": {"PAGEDSERVE_EXECUTOR_BIND": f"tcp://{loop}:{ports['executor']}",
                         "PAGEDSERVE_KV_CACHE_GIB": "0.2", "PAGEDSERVE_SWAP_SPACE_GIB": "0.1",
                         "PAGEDSERVE_NUM_THREADS": "1"},
        "gateway": {"PAGEDSERVE_EXECUTOR_ADDRS": f"executor-0@tcp://{loop}:{ports['executor']}", "PAGEDSERVE_HOST": loop,
                    "PAGEDSERVE_PORT": str(ports["gateway"])},
    }
    common = {"PAGEDSERVE_MODEL": str(smollm_dir), "PAGEDSERVE_BLOCKMGR_ADDR": f"tcp://{loop}:{ports['blockmgr']}",
              "PAGEDSERVE_KEYS_DIR": str(tmp_path / "keys")}
    # Only compose's variables: none of this shell's PAGEDSERVE_ settings.
    base_env = {**{k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)},
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    try:
        for name in start_order(services):
            svc = services[name]
            declared = {k: interpolate(str(v), base_env) for k, v in (svc.get("environment") or {}).items()}
            for var in overrides[name]:
                assert var in declared, f"{name} has no {var} in compose.yaml"
            env = {**base_env, **declared, **{k: v for k, v in common.items() if k in declared}, **overrides[name]}
            argv = argv_of(svc["command"], env)
            if name == "redis":
                assert "redis-server" in argv[-1]
                env["PATH"] = f"{Path(redis_server).parent}{os.pathsep}{env['PATH']}"
            logs[name] = open(tmp_path / f"{name}.log", "w")
            procs[name] = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=logs[name], stderr=subprocess.STDOUT)
            check = healthcheck_argv(svc["healthcheck"]["test"], env)
            deadline = time.monotonic() + 240
            while True:
                if procs[name].poll() is not None:
                    pytest.fail(f"{name} exited with {procs[name].returncode}:\n"
                                f"{(tmp_path / f'{name}.log').read_text()[-3000:]}")
                if subprocess.run(check, env=env, cwd=tmp_path, capture_output=True, timeout=30).returncode == 0:
                    break
                assert time.monotonic() < deadline, f"{name} never passed its healthcheck {check}"
                time.sleep(1)

        import openai

        client = openai.OpenAI(base_url=f"http://{loop}:{ports['gateway']}/v1", api_key="unused", max_retries=0,
                               timeout=180)
        model = services["gateway"]["environment"]["PAGEDSERVE_SERVED_MODEL_NAME"]
        assert client.models.list().data[0].id == model
        reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
        assert "Paris" in reply.choices[0].message.content
        # Every ZeroMQ connection used the keys the block manager created, private to their owner.
        assert sorted(p.name for p in (tmp_path / "keys").glob("*.key")) == ["blockmgr.key", "executor-0.key",
                                                                           "gateway.key"]
        assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in (tmp_path / "keys").glob("*.key_secret"))
        # The block manager keeps its state in this Redis.
        keys = subprocess.run([shutil.which("redis-cli") or "redis-cli", "-p", str(ports["redis"]), "--scan",
                               "--pattern", "pagedserve:*"], capture_output=True, text=True, timeout=30).stdout
        assert "pagedserve:blockmgr:executor:executor-0" in keys
        assert httpx.get(f"http://{loop}:{ports['gateway']}/health", timeout=10).status_code == 200
    finally:
        for name in reversed(list(procs)):
            proc = procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for f in logs.values():
            f.close()
