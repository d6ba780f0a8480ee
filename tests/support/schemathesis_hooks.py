"""schemathesis hooks (loaded through SCHEMATHESIS_HOOKS by tests/test_openapi_fuzz.py): every generated job config
builds from a repository that does not exist, so each job fails at once in its clone, with no network.

Only values that already match the schema are replaced (by other values that match it), so a positive case stays
positive and a negative case stays negative.
"""

from __future__ import annotations

import os
import re
from typing import Any

import schemathesis

from jobforge.rules import (
    REGISTRY_URL_SCHEMA_PATTERN,
    REPO_URL_SCHEMA_PATTERN,
    VAULT_PATH_PATTERN,
    WEBHOOK_URL_SCHEMA_PATTERN,
)

MISSING_REPO = "/nonexistent/jobforge-schemathesis.git"
REGISTRY = os.environ.get("JOBFORGE_FUZZ_REGISTRY", "127.0.0.1:9")
VAULT_PREFIX = "fuzz"
"""The fuzzed service allows Vault paths under this prefix (JOBFORGE_VAULT_ALLOWED_PATHS): which paths an owner
may name is the operator's policy, not something a schema can say."""
_REPLACE = (("repo_url", REPO_URL_SCHEMA_PATTERN, MISSING_REPO),
            ("registry_url", REGISTRY_URL_SCHEMA_PATTERN, REGISTRY),
            ("webhook_url", WEBHOOK_URL_SCHEMA_PATTERN, None),
            ("git_credentials_path", VAULT_PATH_PATTERN, VAULT_PREFIX + "/git"),
            ("registry_credentials_path", VAULT_PATH_PATTERN, VAULT_PREFIX + "/registry"))


def fast_failing(value: Any) -> Any:
    if isinstance(value, list):
        return [fast_failing(item) for item in value]
    if not isinstance(value, dict):
        return value
    value = {key: fast_failing(item) for key, item in value.items()}
    config = value.get("job_config")
    if isinstance(config, dict):
        config = dict(config)
        for field, pattern, replacement in _REPLACE:
            if isinstance(config.get(field), str) and re.fullmatch(pattern, config[field]):
                config[field] = replacement
        test = config.get("test")
        if isinstance(test, dict) and isinstance(test.get("vault_secrets"), list):
            test = dict(test)
            test["vault_secrets"] = [
                {**secret, "path": f"{VAULT_PREFIX}/secret"}
                if isinstance(secret, dict) and isinstance(secret.get("path"), str)
                and re.fullmatch(VAULT_PATH_PATTERN, secret["path"]) else secret
                for secret in test["vault_secrets"]]
            config["test"] = test
        value["job_config"] = config
    return value


@schemathesis.hook
def map_body(context, body):
    return fast_failing(body)
