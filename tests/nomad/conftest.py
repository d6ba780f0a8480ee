"""Fixtures for the Nomad job tests (helpers live in tests/nomad/helpers.py)."""

from __future__ import annotations

import pytest

from jobforge.config import JobConfig
from tests.nomad.helpers import make_config


@pytest.fixture
def gpu_vault_config() -> JobConfig:
    """Everything spec-affecting at once, shaped like the reference README's GPU and Vault examples."""
    return make_config(
        git_credentials_path="secret/nomad/jobs/git-credentials",
        registry_credentials_path="secret/nomad/jobs/registry-credentials",
        test={
            "entry_point": True,
            "gpu_required": True,
            "gpu_count": 2,
            "env": {"NVIDIA_VISIBLE_DEVICES": "all"},
            "vault_policies": ["ml-secrets-policy", "transcription-policy"],
            "vault_secrets": [
                {"path": "secret/data/aws/transcription",
                 "fields": {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY"}},
                {"path": "secret/data/ml/api-keys", "fields": {"hf-token": "HUGGING_FACE_HUB_TOKEN"}},
            ],
            "constraints": [
                {"attribute": "${node.datacenter}", "value": "us-west-2", "operand": "="},
                {"attribute": "${meta.storage-type}", "operand": "is_set"},
                {"attribute": "${attr.kernel.version}", "operand": "version", "value": "> 3.19"},
                {"attribute": "${meta.scratch}", "operand": "is_not_set"},
            ],
            "resource_limits": {"cpu": "8000", "memory": "16384", "disk": "20480"},
        },
    )
