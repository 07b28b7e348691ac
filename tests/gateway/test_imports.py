"""The server's import graph: the gateway stays free of the benchmarks, plotting and the model."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Heavy or optional modules the gateway must never pull in (the bench is imported lazily by
# `pagedserve bench`; the model lives in the executor process).
FORBIDDEN = ("matplotlib", "benchmarks", "executor.model", "executor.engine")


def _imported_by(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    return json.loads(out.splitlines()[-1])


def _forbidden(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_gateway_app_imports_no_bench_plotting_or_model():
    modules = _imported_by("import gateway.app")
    assert "gateway.app" in modules and "executor.client" in modules  # the probe saw real imports
    assert _forbidden(modules) == []


def test_cli_imports_the_bench_only_for_the_bench_command():
    modules = _imported_by("import gateway.cli")
    assert _forbidden(modules) == []
    modules = _imported_by(
        "from gateway.cli import main\n"
        "try:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass"
    )
    assert "benchmarks.serving.cli" in modules
