"""What a user installs and runs: the wheel in a fresh venv, the console scripts from outside the checkout, the demo.

None of these tests puts the checkout on ``PYTHONPATH``/``sys.path``: the scripts must work as installed.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from jobforge.devinfra import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Import names of the distributions we declare (where they differ from the distribution name).
IMPORT_NAMES = {
    "pydantic-settings": "pydantic_settings", "prometheus-client": "prometheus_client", "pyyaml": "yaml",
    "gitpython": "git", "python-consul2": "consul", "python-hcl2": "hcl2", "pytest-asyncio": "pytest_asyncio",
}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | extra


def _imported_top_levels(folders: list[Path]) -> set[str]:
    names: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    return names


def _declared() -> tuple[list[str], list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()  # noqa: E731
    return [name(r) for r in project["dependencies"]], [name(r) for r in project["optional-dependencies"]["test"]]


def test_every_runtime_dependency_is_imported_by_production_code():
    runtime, _ = _declared()
    imported = _imported_top_levels([ROOT / "jobforge", ROOT / "cli"])
    unused = [d for d in runtime if IMPORT_NAMES.get(d, d.replace("-", "_")) not in imported]
    assert unused == [], f"declared runtime dependencies nothing in jobforge/ or cli/ imports: {unused}"


# pytest plugins are used through their configuration, not imported: the option that proves each is in use.
PLUGIN_OPTIONS = {"pytest-asyncio": "asyncio_mode"}


def test_every_test_dependency_is_imported_by_the_tests():
    _, test = _declared()
    imported = _imported_top_levels([ROOT / "tests"])
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    unused = [d for d in test if IMPORT_NAMES.get(d, d.replace("-", "_")) not in imported
              and PLUGIN_OPTIONS.get(d) not in ini]
    assert unused == [], f"declared test dependencies no test imports: {unused}"


def test_no_installed_module_of_ours_has_a_name_another_distribution_can_own():
    """Only `jobforge` and `jobforge_cli` are installed as top-level packages: no `cli`, `tests`, `common`."""
    record = next((BIN.parent / "lib").glob("python3*/site-packages/jobforge-*.dist-info/RECORD"))
    tops = {line.split("/", 1)[0] for line in record.read_text().splitlines() if "/" in line}
    assert {t for t in tops if not t.endswith(".dist-info") and t != ".."} == {"jobforge", "jobforge_cli"}


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """The built wheel installed into a new venv together with python-hcl2 (which ships a top-level `cli`)."""
    base = tmp_path_factory.mktemp("install")
    wheels = base / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(ROOT)], check=True, env=_clean_env())
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--require-hashes", "--no-deps", "-r", str(ROOT / "requirements" / "test.lock")],
                   check=True, env=_clean_env())
    wheel = next(wheels.glob("jobforge-*.whl"))
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, env=_clean_env())
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "cli").is_dir(), "python-hcl2's own top-level `cli` package should be installed next to ours"
    return venv


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["jobforge", "--help"], ["jobforge", "version-info"],
                                  ["jobforge-service", "--help"], ["jobforge-service", "--version"]])
def test_installed_scripts_run_from_outside_the_checkout(fresh_venv, tmp_path, argv):
    result = subprocess.run([str(fresh_venv / "bin" / argv[0]), *argv[1:]], cwd=tmp_path, env=_clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ModuleNotFoundError" not in result.stderr
    if argv[-1] == "--help":
        assert "Usage" in result.stdout or "usage" in result.stdout


@pytest.mark.slow
def test_installed_service_answers_health(fresh_venv, tmp_path):
    port = free_port()
    env = _clean_env(SERVER_HOST="127.0.0.1", SERVER_PORT=str(port), METRICS_PORT="0",
                     JOBFORGE_DATA_DIR=str(tmp_path / "data"), REGISTRY_URL="127.0.0.1:9")
    proc = subprocess.Popen([str(fresh_venv / "bin" / "jobforge-service")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Its log line is the event that it listens: read until it says so (or exits).
        for line in proc.stdout:
            if "listening on" in line:
                break
        else:
            pytest.fail(f"jobforge-service exited with {proc.wait()} before listening")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert json.load(resp) == {"status": "ok"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _clean_copy(dest: Path) -> Path:
    """The tracked files of this checkout as they are now (no .venv, no caches): what a fresh clone holds."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.e2e
def test_demo_runs_from_a_clean_copy_as_make_demo_does(tmp_path):
    copy = _clean_copy(tmp_path / "checkout")
    result = subprocess.run([sys.executable, "examples/demo.py"], cwd=copy, env=_clean_env(TMPDIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    published = re.findall(r"^\s+(127\.0\.0\.1:\d+/hello:\S+)@sha256:[0-9a-f]{8}", out, re.MULTILINE)
    assert {ref.rsplit(":", 1)[1] for ref in published} >= {"latest", "demo"}, out[-4000:]
    tags = re.search(r"Tags of hello in the registry: (.*)", out)
    assert tags and "latest" in tags.group(1) and "demo" in tags.group(1), out[-4000:]
