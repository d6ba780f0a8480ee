"""Nothing of the host reaches a job (issue 7, acceptance 2), through the real service, buildah and registry.

A hostile job's RUN step and test commands read /proc/*/environ, the service's data dir, another running job's
workspace and a host file; one test command replaces every file in its writable mounts with symlinks to that
host file. Neither the host file's marker, nor a marker planted in the data dir or in the other job's
workspace, nor the service's secret values, nor the values of its other variables (settings the phase scripts
get, like JOBFORGE_GIT_CREDENTIAL_HOST, and a variable of the service's own environment) appear in any log,
status or history. Both also try to kill a host process and to reach the service's API on 127.0.0.1: both fail,
the process lives. Both ask the registry (on 127.0.0.1) for its catalog: the test command cannot reach it, and
the RUN step, which finds the build's registry relay on that port, is refused by it (the relay serves buildah's
own layer-cache requests only). Each probe prints a word built by shell arithmetic (`nokill42`, never in the
probe's text) so the test sees that it ran.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.support.gitrepo import GitRepo
from tests.support.service import ServiceProcess
from tests.test_e2e import EXAMPLE, submit, watch

pytestmark = pytest.mark.e2e

BUILD_USER = "jobforge-build"
SECRETS = {"REGISTRY_USERNAME": "isolation-user", "REGISTRY_PASSWORD": f"reg-secret-{uuid.uuid4().hex}",
           "JOBFORGE_GIT_USERNAME": "isolation-git", "JOBFORGE_GIT_PASSWORD": f"git-secret-{uuid.uuid4().hex}"}
# Not secrets, but the service's: the first two reach the phase scripts (which need them), the last one does not.
SERVICE_ENV = {"JOBFORGE_GIT_CREDENTIAL_HOST": f"git-host-{uuid.uuid4().hex}.invalid",
               "JOBFORGE_GIT_PLAIN_HTTP_HOSTS": f"plain-host-{uuid.uuid4().hex}.invalid",
               "FOO_SERVICE": f"service-marker-{uuid.uuid4().hex}"}
HOST_MARKER = f"host-marker-{uuid.uuid4().hex}"
DATA_MARKER = f"data-marker-{uuid.uuid4().hex}"
WORKSPACE_MARKER_PREFIX = "ws-marker-"

PROBE = r"""#!/bin/sh
# What a hostile step tries; it prints whatever it gets, so a leak lands in the job's log.
echo "probe-$1-begins"
for f in /proc/[0-9]*/environ; do echo "== $f"; tr '\0' '\n' < "$f" 2>&1; done
for p in $PATHS "$HOST_FILE"; do
  echo "== $p"; ls -la "$p" 2>&1; cat "$p" 2>&1 | head -c 20000
  find "$p" -type f 2>/dev/null | while read -r f; do cat "$f" 2>&1 | head -c 20000; done
done
echo "== pids: $(ls /proc | grep -E '^[0-9]+$' | tr '\n' ' ')"
if kill -9 "$HOST_PID" 2>/dev/null; then echo "kill$((40+2))"; else echo "nokill$((40+2))"; fi
get() {  # port path: the status line of a GET of 127.0.0.1:port/path, or why there is none (busybox's wget
  # segfaults under the build user's namespaces, which would pass for "unreachable"; nc does not)
  printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$2" "$1" | nc 127.0.0.1 "$1" 2>&1 \
    | head -n 1 | tr -d '\r'
}
health=$(get "$API_PORT" /health); echo "service health: ${health:-no answer}"
case "$health" in *" 200 "*) echo "reach$((40+2))" ;; *) echo "noreach$((40+2))" ;; esac
catalog=$(get "$REGISTRY_PORT" /v2/_catalog); echo "registry catalog: ${catalog:-no answer}"
case "$catalog" in *" 200 "*) echo "catalog$((40+2))" ;; *) echo "nocatalog$((40+2))" ;; esac
echo "probe-$1-ends"
"""

REFUSED_BY_KERNEL = "nc: can't connect to remote host (127.0.0.1): Connection refused"  # busybox's words

# Replace every file of every writable mount (but the root fs and the kernel's) with a symlink to the host file.
LINK_MOUNTS = r"""#!/bin/sh
for m in $(awk '$4 ~ /(^|,)rw(,|$)/ {print $2}' /proc/self/mounts); do
  case "$m" in /|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  if [ -d "$m" ]; then
    for f in "$m"/* "$m"/.[!.]*; do
      if [ -e "$f" ] || [ -L "$f" ]; then rm -rf "$f" && ln -s "$HOST_FILE" "$f" && echo "linked $f"; fi
    done
  elif ln -sf "$HOST_FILE" "$m" 2>/dev/null; then echo "linked $m"; fi
done
echo "links-$((40+2))"
"""

HOSTILE_DOCKERFILE = """ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG HOST_PID
ARG API_PORT
ARG REGISTRY_PORT
ARG PATHS
ARG HOST_FILE
COPY probe.sh link-mounts.sh /
RUN sh /probe.sh build
"""


def build_users() -> list[str]:
    """As root: phases as the build user (the default) and as root (JOBFORGE_BUILD_USER=); else as ourselves."""
    return [BUILD_USER, ""] if os.geteuid() == 0 else [""]


@pytest.fixture(scope="module")
def shared_dir():
    """World-readable (unlike pytest's root-private temp dirs): the build user clones from here."""
    path = Path(tempfile.mkdtemp(prefix="jobforge-isolation-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def host_file(shared_dir) -> Path:
    """A host file any user could read: only the isolation keeps it out of the job. The marker is repeated, so
    a read from any offset (a follower's position in the file it replaced) still holds it whole."""
    path = shared_dir / "host-secret.txt"
    path.write_text((HOST_MARKER + "\n") * 2000)
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module", params=build_users(), ids=lambda user: f"build_user={user or 'service'}")
def service(request, tmp_path_factory, registry, base_image):
    data = tmp_path_factory.mktemp("isolation-service")
    with ServiceProcess(data, registry.host, MAX_CONCURRENT_JOBS="2", JOBFORGE_BUILD_USER=request.param,
                        **SECRETS, **SERVICE_ENV) as svc:
        planted = svc.data_dir / "planted.txt"
        planted.write_text(DATA_MARKER + "\n")
        planted.chmod(0o644)
        yield svc, request.param


@pytest.fixture
def host_process(service):
    """A host process the build steps could signal if they shared its PID namespace (and its user)."""
    _, user = service
    account = pwd.getpwnam(user) if user else None
    kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}
    proc = subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL, **kwargs)
    yield proc
    proc.kill()
    proc.wait()


def repo(shared_dir: Path, files: dict[str, str], user: str) -> GitRepo:
    """A repository the phases' user owns (git refuses to fetch from another user's repository)."""
    path = shared_dir / f"repo-{uuid.uuid4().hex[:8]}"
    made = GitRepo.from_dir(path, EXAMPLE)
    made.commit("isolation probe", files)
    if user:
        subprocess.run(["chown", "-R", f"{user}:", str(path)], check=True)
    return made


def evidence(svc: ServiceProcess, job_id: str) -> tuple[str, dict]:
    """Everything the service tells about a job (status, logs) as one text, plus the logs by phase."""
    _, status = svc.get(f"/json/job/{job_id}/status")
    _, logs = svc.get(f"/json/job/{job_id}/logs")
    return json.dumps([status, logs]), logs["logs"]


def test_a_hostile_job_reaches_nothing_of_the_host(service, shared_dir, host_file, host_process, registry,
                                                   base_image):
    svc, user = service
    workspace_marker = WORKSPACE_MARKER_PREFIX + uuid.uuid4().hex
    # Job A keeps running (its test command waits) while the hostile job B runs: A's workspace is live.
    quiet = repo(shared_dir, {"run-tests.sh": f"#!/bin/sh\necho {workspace_marker}\necho a-running\nsleep 3600\n"}, user)
    base = {"owner": "isolation", "registry_url": registry.host, "build_args": {"BASE_IMAGE": base_image}}
    job_a = submit(svc, {**base, "repo_url": str(quiet.path), "image_name": f"quiet-{uuid.uuid4().hex[:8]}",
                         "test": {"commands": ["/app/run-tests.sh"]}})
    assert watch(svc.url, job_a, until_line="a-running")["status"] == "TESTING"

    home = Path(pwd.getpwnam(BUILD_USER).pw_dir) if user else None
    workspaces = [svc.data_dir / "work" / job_a] + ([home / ".local/share/jobforge/work" / job_a] if home else [])
    probe_env = {"HOST_PID": str(host_process.pid), "API_PORT": str(svc.port), "HOST_FILE": str(host_file),
                 "REGISTRY_PORT": registry.host.rsplit(":", 1)[1],
                 "PATHS": " ".join(str(p) for p in [svc.data_dir, *workspaces])}
    hostile = repo(shared_dir, {"Dockerfile": HOSTILE_DOCKERFILE, "probe.sh": PROBE, "link-mounts.sh": LINK_MOUNTS}, user)
    job_b = submit(svc, {**base, "repo_url": str(hostile.path), "image_name": f"hostile-{uuid.uuid4().hex[:8]}",
                         "build_args": {"BASE_IMAGE": base_image, **probe_env},
                         "test": {"commands": ["sh /link-mounts.sh", "sh /probe.sh test"], "env": probe_env}})
    final_b = watch(svc.url, job_b)

    svc.post("/json/killJob", {"job_id": job_a})
    watch(svc.url, job_a)
    text_b, logs_b = evidence(svc, job_b)
    text_a, _ = evidence(svc, job_a)
    _, history = svc.post("/json/getHistory", {"limit": 100})
    everything = "\n".join([text_a, text_b, json.dumps(history)])

    for secret in [HOST_MARKER, DATA_MARKER, SECRETS["REGISTRY_PASSWORD"], SECRETS["JOBFORGE_GIT_PASSWORD"],
                   *SERVICE_ENV.values()]:
        assert secret not in everything
    assert workspace_marker not in text_b  # A's own log has it; B never read it
    assert final_b["status"] == "SUCCEEDED", (final_b, logs_b)
    build, test = "\n".join(logs_b["build"]), "\n".join(logs_b["test"])
    for phase, log in (("build", build), ("test", test)):
        # The probes ran to their end, and every attempt on the host failed.
        assert f"probe-{phase}-ends" in log and "nokill42" in log and "noreach42" in log and "nocatalog42" in log, log
        assert not {"kill42", "reach42", "catalog42"} & set(log.splitlines())
        # Nothing listens on the service's port in the step's namespace (nc ran and was refused: no crash).
        assert f"service health: {REFUSED_BY_KERNEL}" in log.splitlines(), log
    assert f"registry catalog: {REFUSED_BY_KERNEL}" in test.splitlines(), test
    # The RUN step reached the relay (the registry's port in its namespace), which refused it.
    assert "registry catalog: HTTP/1.1 403 Forbidden" in build.splitlines(), build
    assert "==> registry relay refused GET /v2/_catalog: it comes from a build step" in build, build
    assert "linked /.jobforge-out/output" in test and "links-42" in test, test
    assert host_process.poll() is None, "a build step killed a host process"


@pytest.mark.skipif(os.geteuid() != 0, reason="the build user applies to a service run as root")
def test_a_root_service_without_its_build_user_refuses_to_start(tmp_path):
    svc = ServiceProcess(tmp_path / "service", "127.0.0.1:1", JOBFORGE_BUILD_USER="jobforge-no-such-user")
    with pytest.raises(RuntimeError, match="exited with code 2") as refused:
        svc.start()
    assert "JOBFORGE_BUILD_USER 'jobforge-no-such-user' does not exist" in str(refused.value)
