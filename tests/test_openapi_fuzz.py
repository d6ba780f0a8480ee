"""schemathesis against a real started service: the OpenAPI document tells the truth.

`st run <service>/openapi.json --checks all` with bounded examples must find nothing: no 5xx, every response
and status as documented, every schema-valid request accepted (2xx, or 401/403/404/409/429 as documented), every
schema-violating one refused. Jobs build from a repository that does not exist (tests/support/schemathesis_hooks.py),
so each fails at once in its clone. Not fuzzed: the WebSocket routes (`/json/streamLogs`,
`/json/job/{id}/watch`; schemathesis does not speak WebSocket) and the SSE stream (it stays open until the job
is settled); tests/test_streams.py and tests/test_e2e_streams.py cover them.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from jobforge import devinfra
from tests.support.schemathesis_hooks import MISSING_REPO
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.slow

SUPPORT = Path(__file__).resolve().parent / "support"
STREAMS = r"/(watch|streamLogs|logs/stream)$"
JSON_RPC_OPERATIONS = "--include-operation-id jsonrpc --include-operation-id mcp"


HOOKS_DIR = Path(__file__).resolve().parent / "support"


def test_schemathesis_finds_nothing(tmp_path):
    token = secrets.token_urlsafe(32)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token}\n")
    tokens.chmod(0o600)
    with devinfra.Registry(tmp_path / "registry") as registry, ServiceProcess(
            tmp_path / "service", registry.host, JOBFORGE_API_TOKENS_FILE=str(tokens),
            JOBFORGE_VAULT_ALLOWED_PATHS="fuzz", MAX_CONCURRENT_JOBS="8", MAX_QUEUED_JOBS="100000") as service:
        # `st` imports the hooks module by name: only its own folder goes on the path, never the checkout, so the
        # hooks' `import jobforge` is the installed package.
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(HOOKS_DIR),
               "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "JOBFORGE_FUZZ_REGISTRY": registry.host}
        # A real job, so the GET routes (status, logs) answer with results too, not only 404s.
        service.token = token
        status, submitted = service.post("/json/submitJob", {"job_config": {
            "owner": "fuzz", "repo_url": MISSING_REPO, "image_name": "fuzz", "registry_url": registry.host}})
        assert status == 200, submitted
        config = tmp_path / "schemathesis.toml"
        config.write_text(f'[parameters]\n"path.job_id" = "{submitted["job_id"]}"\n')
        common = [str(Path(sys.executable).with_name("st")), "--config-file", str(config), "run",
                  f"{service.url}/openapi.json",
                  "--checks", "all", "--header", f"Authorization: Bearer {token}", "--phases", "examples,fuzzing",
                  "--max-examples", "40", "--seed", "1", "--workers", "2", "--no-color"]

        def st(*args: str) -> None:
            run = subprocess.run([*common, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=600)
            assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:] + service.log_tail(40)

        st("--exclude-path-regex", STREAMS, *JSON_RPC_OPERATIONS.replace("include", "exclude").split())
        # JSON-RPC 2.0 (`/json`) and MCP's JSON-RPC (`/mcp`) answer a malformed envelope (parse error, invalid
        # request) with an error object in an HTTP 200 reply, as JSON-RPC says; negative_data_rejection wants a
        # 4xx there. Every other check runs on them.
        st(*JSON_RPC_OPERATIONS.split(), "--exclude-checks", "negative_data_rejection")
