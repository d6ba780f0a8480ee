"""Shared pytest fixtures."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobforge.devinfra import Registry, seed_busybox_image
from tests.doubles.consul import FakeConsul
from tests.support.githttp import GitHttpServer

# ======================================================================================================
# Real infrastructure for e2e tests: registries, buildah storage, base image, git-over-HTTP.
# (Owned by the task-scripts work; add other fixtures in their own section below.)
# ======================================================================================================

AUTH_USER = "ci"
AUTH_PASSWORD = "s3cret-pass"


@dataclass(frozen=True)
class BuildahStorage:
    root: Path
    runroot: Path


@pytest.fixture(scope="session")
def buildah_storage(tmp_path_factory):
    """containers-storage root/runroot shared by the session (so layer caching is exercised).

    Removed at the end: the vfs driver keeps a full copy of the root filesystem per layer.
    """
    base = tmp_path_factory.mktemp("buildah")
    storage = BuildahStorage(root=base / "root", runroot=base / "runroot")
    storage.root.mkdir()
    storage.runroot.mkdir()
    yield storage
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """Plain-HTTP registry without auth on 127.0.0.1 (`.host`, `.tags()`, `.manifest_digest()`)."""
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory):
    """Registry requiring htpasswd basic auth: user AUTH_USER, password AUTH_PASSWORD."""
    with Registry(tmp_path_factory.mktemp("auth-registry"), auth=(AUTH_USER, AUTH_PASSWORD)) as reg:
        yield reg


@pytest.fixture(scope="session")
def base_image(registry, buildah_storage) -> str:
    """busybox seeded into `registry`; e.g. `127.0.0.1:PORT/busybox:latest`."""
    return seed_busybox_image(registry.host, buildah_storage.root, buildah_storage.runroot)


@pytest.fixture(scope="session")
def git_http_server(tmp_path_factory):
    """git smart-HTTP server; `.url` is the base URL, `.serve(repo, name)` publishes a repo there."""
    with GitHttpServer(tmp_path_factory.mktemp("git-http")) as server:
        yield server


# ======================================================================================================
# End of the e2e infrastructure section.
# ======================================================================================================


# ======================================================================================================
# In-process doubles of the cluster services, started on 127.0.0.1 per test.
# ======================================================================================================


@pytest.fixture
async def fake_consul_agent():
    """A `FakeConsul` serving on a free loopback port (`.addr` is host:port)."""
    consul = FakeConsul()
    await consul.start()
    yield consul
    await consul.stop()
