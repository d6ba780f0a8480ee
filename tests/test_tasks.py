"""End-to-end tests of templates/tasks/*.py: the scripts run as subprocesses, exactly as a backend runs them,
against a real docker-registry, real buildah/skopeo and real git repositories (file:// and smart HTTP).

Expected values come from independent sources: the registry's HTTP API, the built image's content (read by
the test phase), and the host filesystem.
"""

from __future__ import annotations

import base64
import fcntl
import json
import re
import os
import signal
import subprocess
import sys
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobforge.devinfra import Registry
from tests.conftest import BuildahStorage
from tests.support.githttp import GitHttpServer
from tests.support.gitrepo import GitRepo

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "templates" / "tasks"
HELLO = ROOT / "examples" / "hello"
TIMEOUT = 300


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def error(self) -> str:
        """The contract's last stderr line (`ERROR: …`), or '' when there is none."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines and lines[-1].startswith("ERROR: ") else ""


@dataclass
class Job:
    """One job's payload plus a runner for its phase scripts (fresh workdir per phase)."""

    tmp: Path
    storage: object
    payload: dict
    env: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.payload["job_id"]

    @property
    def temp_image(self) -> str:
        return self.payload["temp_image"]

    def phase_env(self, phase: str, **extra: str) -> tuple[dict, Path]:
        workdir = self.tmp / f"{phase}-{uuid.uuid4().hex[:6]}"
        workdir.mkdir()
        payload_path = workdir.with_suffix(".json")
        payload_path.write_text(json.dumps({**self.payload, "phase": phase}))
        env = {
            "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
            "JOBFORGE_PAYLOAD": str(payload_path), "JOBFORGE_WORKDIR": str(workdir),
            "JOBFORGE_BUILDAH_ROOT": str(self.storage.root), "JOBFORGE_BUILDAH_RUNROOT": str(self.storage.runroot),
            **self.env, **extra,
        }
        return env, workdir

    def run(self, phase: str, **extra_env: str) -> Outcome:
        env, _ = self.phase_env(phase, **extra_env)
        proc = subprocess.run([sys.executable, str(TASKS / f"{phase}.py")], env=env, capture_output=True,
                              text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        return Outcome(proc.returncode, proc.stdout, proc.stderr)


def ok(outcome: Outcome) -> Outcome:
    assert outcome.returncode == 0, outcome.output
    assert outcome.error == ""
    return outcome


def repo_name(ref: str) -> tuple[str, str]:
    """`host/name:tag` -> (name, tag), for the registry API helpers."""
    name, tag = ref.split("/", 1)[1].rsplit(":", 1)
    return name, tag


def containers(storage) -> list[str]:
    out = subprocess.run(["buildah", "--storage-driver", "vfs", "--root", str(storage.root), "--runroot",
                          str(storage.runroot), "containers", "--format", "{{.ContainerName}}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.fixture
def hello_repo(tmp_path) -> GitRepo:
    return GitRepo.from_dir(tmp_path / "hello", HELLO)


@pytest.fixture
def make_job(tmp_path, registry, base_image, buildah_storage):
    """make_job(repo_url, **payload_overrides) -> Job with the reference payload shape."""

    def make(repo_url: str, **overrides) -> Job:
        job_id = uuid.uuid4().hex
        payload = {
            "job_id": job_id, "phase": "build", "repo_url": repo_url, "git_ref": "main",
            "dockerfile_path": "Dockerfile", "dockerfile_context": ".",
            "build_args": {"BASE_IMAGE": base_image}, "target": None, "clear_cache": False,
            "temp_image": f"{registry.host}/temp-hello:{job_id}", "tls_verify": False,
            "test": {"entry_point": False, "commands": [], "env": {}, "secret_env": []},
            "publish_targets": [f"{registry.host}/hello:{job_id}"],
        }
        payload.update(overrides)
        jobdir = tmp_path / f"job-{job_id[:8]}"
        jobdir.mkdir()
        return Job(jobdir, buildah_storage, payload)

    return make


@pytest.fixture
def built(make_job, hello_repo) -> Job:
    """A job whose temp image is already built and pushed."""
    job = make_job(f"file://{hello_repo.path}")
    ok(job.run("build"))
    return job


# --- the happy path ---------------------------------------------------------------------------------


def test_build_test_publish_cleanup_with_three_tags(make_job, hello_repo, registry, base_image):
    job = make_job(f"file://{hello_repo.path}", build_args={"BASE_IMAGE": base_image, "GREETING": "Howdy"})
    job.payload["test"] = {"entry_point": True,
                           "commands": ["/app/run-tests.sh", 'test "$TEST_MODE" = ci', "printf no-newline"],
                           "env": {"TEST_MODE": "ci"}, "secret_env": []}
    targets = [f"{registry.host}/hello:{job.id}", f"{registry.host}/hello:latest", f"{registry.host}/hello:v1"]
    job.payload["publish_targets"] = targets

    build = ok(job.run("build"))
    temp_digest = registry.manifest_digest(*repo_name(job.temp_image))
    assert temp_digest and f"digest: {temp_digest}" in build.stdout
    assert f"commit: {hello_repo.head()}" in build.stdout

    test = ok(job.run("test"))
    assert "Howdy, world!" in test.stdout  # the image's ENTRYPOINT + CMD
    assert "ok: Howdy, tester! (mode: ci)" in test.stdout  # run-tests.sh with the test env
    assert "no-newline" in test.stdout.splitlines()  # not glued to the next line
    assert f"jobforge-test-{job.id}" not in containers(job.storage)

    publish = ok(job.run("publish"))
    digests = {ref: registry.manifest_digest(*repo_name(ref)) for ref in targets}
    assert set(digests.values()) == {temp_digest}
    assert set(registry.tags("hello")) >= {job.id, "latest", "v1"}
    for ref in targets:
        assert f"Published: {ref}@{temp_digest}" in publish.stdout

    cleanup = ok(job.run("cleanup"))
    assert f"deleted temp image {job.temp_image}" in cleanup.stdout
    assert not registry.has_manifest(*repo_name(job.temp_image))
    assert all(registry.manifest_digest(*repo_name(ref)) == temp_digest for ref in targets)
    again = ok(job.run("cleanup"))  # idempotent
    assert "already gone" in again.stdout


def test_the_test_phase_uses_the_local_image_it_verified_instead_of_pulling(built, registry, tmp_path):
    built.payload["test"]["commands"] = ["cat /app/greeting.txt || true"]
    outcome = ok(built.run("test"))
    commands = [line for line in outcome.stdout.splitlines() if line.startswith("+ ")]
    froms = [line for line in commands if " from " in line]
    assert len(froms) == 1 and "--pull=never" in froms[0] and "--pull-always" not in froms[0]
    assert not any(" pull " in line for line in commands)
    assert f"the same image as {built.temp_image}" in outcome.stdout

    # Another node (empty storage): the image is pulled.
    built.storage = BuildahStorage(root=tmp_path / "other" / "root", runroot=tmp_path / "other" / "runroot")
    elsewhere = ok(built.run("test"))
    assert f"pulling {built.temp_image}" in elsewhere.stdout
    assert any("--pull-always" in line for line in elsewhere.stdout.splitlines() if line.startswith("+ "))


def test_a_local_image_that_is_not_the_pushed_one_is_not_used(built, registry, base_image):
    # The temp tag now names another image in the registry than the one stored locally under that name.
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                    f"docker://{base_image}", f"docker://{built.temp_image}"], check=True, capture_output=True)
    outcome = ok(built.run("test"))
    assert f"pulling {built.temp_image}" in outcome.stdout
    assert "--pull=never" not in outcome.stdout


# --- failures -------------------------------------------------------------------------------------------


def test_build_failure_reports_the_failing_step(make_job, tmp_path):
    repo = GitRepo.create(tmp_path / "broken", {"Dockerfile": (
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo 'about to fail: zebra-42' && exit 7\n")})
    job = make_job(f"file://{repo.path}")
    before = containers(job.storage)
    outcome = job.run("build")
    assert outcome.returncode != 0
    assert "about to fail: zebra-42" in outcome.output
    assert outcome.error.startswith("ERROR: image build failed")
    assert containers(job.storage) == before  # no working container left behind


def run_until_then_sigterm(job: Job, phase: str, marker: str) -> tuple[int, str]:
    """Start a phase, wait for `marker` in its output, then SIGTERM its process group like the runner."""
    env, _ = job.phase_env(phase)
    proc = subprocess.Popen([sys.executable, str(TASKS / f"{phase}.py")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:  # synchronise on the script's own output, not on time
        if marker in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


def test_sigterm_during_build_leaves_no_container(make_job, tmp_path):
    repo = GitRepo.create(tmp_path / "slow", {"Dockerfile": (
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo sleeping-$((6 * 7)) && sleep 120\n")})
    job = make_job(f"file://{repo.path}")
    before = containers(job.storage)
    # "sleeping-42" is the RUN's own output (the STEP line shows the unexpanded text), so the kill lands
    # while the step runs; buildah leaks its container if killed while it is still setting the step up.
    returncode, stderr = run_until_then_sigterm(job, "build", "sleeping-42")
    assert returncode != 0
    assert stderr.strip().splitlines()[-1] == "ERROR: terminated by signal"
    assert containers(job.storage) == before


def test_sigterm_while_bud_sets_a_step_up_leaves_no_container(make_job, tmp_path):
    """buildah bud leaves its working container when SIGTERMed right after it announces a RUN step (--force-rm
    or not); the phase removes it on its way out."""
    repo = GitRepo.create(tmp_path / "slow", {"Dockerfile": (  # a step of its own: never a cache hit
        f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN echo {uuid.uuid4().hex} && sleep 120\n")})
    job = make_job(f"file://{repo.path}")
    returncode, stderr = run_until_then_sigterm(job, "build", "STEP 2/")
    assert returncode != 0
    assert stderr.strip().splitlines()[-1] == "ERROR: terminated by signal"
    assert containers(job.storage) == []


def buildah_in(storage, *args: str) -> str:
    return subprocess.run(["buildah", "--storage-driver", "vfs", "--root", str(storage.root), "--runroot",
                           str(storage.runroot), *args], capture_output=True, text=True, check=True).stdout.strip()


def litter(storage, base_image: str) -> str:
    """A working container nobody uses any more, as a killed `buildah bud` leaves it; returns its name."""
    name = f"killed-bud-{uuid.uuid4().hex[:8]}"
    buildah_in(storage, "from", "--pull=never", "--name", name, base_image)
    return name


def test_a_build_removes_the_containers_killed_builds_left(make_job, hello_repo, base_image):
    job = make_job(f"file://{hello_repo.path}")
    left = litter(job.storage, base_image)
    outcome = ok(job.run("build"))
    assert "==> removed 1 leftover build container(s)" in outcome.stdout
    assert containers(job.storage) == []


def test_a_container_of_a_running_step_is_never_swept(make_job, hello_repo, base_image):
    """A step of another job holds the storage's containers lock shared while its containers exist."""
    job = make_job(f"file://{hello_repo.path}")
    with open(job.storage.root / "jobforge-containers.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        live = litter(job.storage, base_image)
        try:
            outcome = ok(job.run("build"))
            assert "leftover" not in outcome.stdout
            assert containers(job.storage) == [live]
        finally:
            buildah_in(job.storage, "rm", live)


def test_a_running_test_phase_keeps_its_container_through_another_jobs_sweep(built):
    built.payload["test"]["commands"] = ["echo test-is-running; sleep 120"]
    env, _ = built.phase_env("test")
    proc = subprocess.Popen([sys.executable, str(TASKS / "test.py")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "test-is-running" in line:
                break
        sweep = ok(built.run("sweep"))  # what each build does before and after its bud
        assert "leftover" not in sweep.stdout
        assert containers(built.storage) == [f"jobforge-test-{built.id}"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    assert containers(built.storage) == []


def test_test_command_failure_stops_and_removes_the_container(built):
    built.payload["test"]["commands"] = ["echo first-ran", "echo boom-output; exit 3", "echo third-ran"]
    outcome = built.run("test")
    assert outcome.returncode != 0
    assert "first-ran" in outcome.stdout and "boom-output" in outcome.stdout
    assert "third-ran" not in outcome.stdout
    assert outcome.error == "ERROR: test command 2 exited with code 3: echo boom-output; exit 3"
    assert f"jobforge-test-{built.id}" not in containers(built.storage)


def test_sigterm_during_test_removes_the_container(built):
    built.payload["test"]["commands"] = ["echo started-sleeping; sleep 120"]
    returncode, stderr = run_until_then_sigterm(built, "test", "started-sleeping")
    assert returncode != 0
    assert stderr.strip().splitlines()[-1] == "ERROR: terminated by signal"
    assert f"jobforge-test-{built.id}" not in containers(built.storage)


# --- Dockerfile location, context, build args, target ----------------------------------------------------


def test_subdirectory_dockerfile_context_build_args_and_target(make_job, tmp_path, base_image):
    repo = GitRepo.create(tmp_path / "multi", {
        "docker/Dockerfile": (
            "ARG BASE_IMAGE\n"
            "FROM ${BASE_IMAGE} AS base\n"
            "ARG FLAVOUR=plain\n"
            "COPY payload.txt /payload.txt\n"
            'RUN echo "stage=base flavour=$FLAVOUR" > /stage.txt\n'
            "FROM base AS release\n"
            'RUN echo "stage=release" > /stage.txt\n'),
        "ctx/payload.txt": "from-the-context-dir\n",
        "payload.txt": "from-the-repo-root\n",
    })
    job = make_job(f"file://{repo.path}", dockerfile_path="docker/Dockerfile", dockerfile_context="ctx",
                   target="base", build_args={"BASE_IMAGE": base_image, "FLAVOUR": "spicy"})
    job.payload["test"]["commands"] = ["cat /stage.txt /payload.txt"]
    ok(job.run("build"))
    test = ok(job.run("test"))
    assert "stage=base flavour=spicy\nfrom-the-context-dir\n" in test.stdout


@pytest.mark.parametrize("field, link", [("dockerfile_path", "Dockerfile.link"), ("dockerfile_context", "ctx")])
def test_paths_escaping_the_clone_are_refused(make_job, tmp_path, field, link):
    repo = GitRepo.create(tmp_path / "escape", {"Dockerfile": "FROM scratch\n"})
    (repo.path / "Dockerfile.link").symlink_to("/etc/hostname")
    (repo.path / "ctx").symlink_to("/")
    repo.commit("symlinks out of the repo")
    outcome = make_job(f"file://{repo.path}", **{field: link}).run("build")
    assert outcome.returncode != 0
    assert outcome.error == f"ERROR: {field} {link!r} points outside the repository"


# --- git refs and transports ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def versioned_repo(tmp_path_factory) -> tuple[GitRepo, dict[str, str]]:
    """main: one -> two; tag v1 (annotated) on one; branch feature: one -> feature."""
    dockerfile = "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nCOPY version.txt /version.txt\n"
    repo = GitRepo.create(tmp_path_factory.mktemp("versioned") / "repo",
                          {"Dockerfile": dockerfile, "version.txt": "one\n"})
    first = repo.head()
    repo.tag("v1", message="release one")
    repo.commit("two", {"version.txt": "two\n"})
    repo.branch("feature", first)
    repo.checkout("feature")
    feature = repo.commit("feature", {"version.txt": "feature\n"})
    repo.checkout("main")
    return repo, {"first": first, "feature": feature}


@pytest.mark.parametrize("ref_kind, expected", [
    ("main", "two"), ("feature", "feature"), ("refs/heads/feature", "feature"), ("v1", "one"),
    ("full-sha", "one"), ("short-sha", "feature"),
])
def test_git_ref_kinds(make_job, versioned_repo, ref_kind, expected):
    repo, shas = versioned_repo
    ref = {"full-sha": shas["first"], "short-sha": shas["feature"][:8]}.get(ref_kind, ref_kind)
    job = make_job(f"file://{repo.path}", git_ref=ref)
    job.payload["test"]["commands"] = [f'test "$(cat /version.txt)" = {expected}']
    build = ok(job.run("build"))
    assert f"commit: {repo.rev_parse(ref)}" in build.stdout
    ok(job.run("test"))


def test_clone_over_smart_http(make_job, hello_repo, git_http_server):
    url = git_http_server.serve(hello_repo, "hello")
    build = ok(make_job(url).run("build"))
    assert f"commit: {hello_repo.head()}" in build.stdout


def test_clone_over_http_with_credentials_bound_to_the_host(make_job, hello_repo, tmp_path):
    password = f"git-pw-{uuid.uuid4().hex[:8]}"
    with GitHttpServer(tmp_path / "private-git", auth=("builder", password)) as server:
        url = server.serve(hello_repo, "hello")
        host = url.split("/")[2]
        job = make_job(url)
        bound = {"GIT_USERNAME": "builder", "JOBFORGE_GIT_CREDENTIAL_HOST": host, "JOBFORGE_GIT_PLAIN_HTTP_HOSTS": host}
        good = ok(job.run("build", GIT_PASSWORD=password, **bound))
        bad = job.run("build", GIT_PASSWORD="wrong-" + password, **bound)
        # The same credential over plain http to a host not listed as plain-http: not offered at all.
        unlisted = job.run("build", GIT_USERNAME="builder", GIT_PASSWORD=password, JOBFORGE_GIT_CREDENTIAL_HOST=host)
    assert password not in good.output + bad.output + unlisted.output
    # Refused without the credential: in words a user acts on (not git's last stderr line).
    assert bad.returncode != 0 and bad.error.startswith(("ERROR: git fetch of", "ERROR: repository not found"))
    assert unlisted.returncode != 0 and unlisted.error.startswith(("ERROR: git fetch of",
                                                                    "ERROR: repository not found"))


def test_clone_with_a_git_credential_store_file(make_job, hello_repo, tmp_path):
    password = f"p@ss/{uuid.uuid4().hex[:8]}"  # percent-encoded in the store, as git writes it
    with GitHttpServer(tmp_path / "private-git", auth=("builder", password)) as server:
        url = server.serve(hello_repo, "hello")
        host = url.split("/")[2]
        store = tmp_path / "git-credentials"
        store.write_text(f"https://other:x@{host}\nhttp://builder:{urllib.parse.quote(password, safe='')}@{host}\n")
        store.chmod(0o600)
        build = ok(make_job(url).run("build", JOBFORGE_GIT_CREDENTIALS=str(store),
                                     JOBFORGE_GIT_PLAIN_HTTP_HOSTS="127.0.0.1"))
    assert f"commit: {hello_repo.head()}" in build.stdout
    assert password not in build.output and urllib.parse.quote(password, safe="") not in build.output


def test_password_in_repo_url_is_used_for_that_host_and_never_printed(make_job, hello_repo, tmp_path):
    password = f"url-pw-{uuid.uuid4().hex[:8]}"
    with GitHttpServer(tmp_path / "private-git", auth=("builder", password)) as server:
        url = server.serve(hello_repo, "hello").replace("http://", f"http://builder:{password}@")
        good = ok(make_job(url).run("build"))
        bad = make_job(url.replace(password, "wrong-" + password)).run("build")
    assert password not in good.output + bad.output
    assert f"http://127.0.0.1:{url.split(':')[3].split('/')[0]}/hello.git" in good.stdout
    assert bad.returncode != 0


# --- registry credentials -------------------------------------------------------------------------------


def auth_file(tmp_path: Path, auths: dict[str, tuple[str, str]]) -> str:
    """A containers auth.json as buildah/skopeo read it."""
    path = tmp_path / f"auth-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()}
                                          for host, (u, p) in auths.items()}}))
    path.chmod(0o600)
    return str(path)


def test_publish_to_a_registry_with_auth(built, auth_registry, registry, tmp_path):
    user, password = auth_registry.auth
    target = f"{auth_registry.host}/hello:{built.id}"
    built.payload.update(publish_targets=[target], insecure_registries=[auth_registry.host])

    authfile = auth_file(tmp_path, {auth_registry.host: (user, password), "127.0.0.1:1": ("x", "other-pw")})
    outcome = ok(built.run("publish", JOBFORGE_REGISTRY_AUTH_FILE=authfile))
    digest = auth_registry.manifest_digest(*repo_name(target))
    assert digest == registry.manifest_digest(*repo_name(built.temp_image))
    assert f"Published: {target}@{digest}" in outcome.stdout
    assert password not in outcome.output


def test_publish_with_wrong_credentials_fails_clearly(built, auth_registry, tmp_path):
    user, password = auth_registry.auth
    wrong = f"not-{password}-{uuid.uuid4().hex[:6]}"
    target = f"{auth_registry.host}/hello:{built.id}"
    built.payload.update(publish_targets=[target], insecure_registries=[auth_registry.host])
    outcome = built.run("publish", JOBFORGE_REGISTRY_AUTH_FILE=auth_file(tmp_path, {auth_registry.host: (user, wrong)}))
    assert outcome.returncode != 0
    assert outcome.error == (f"ERROR: registry {auth_registry.host} rejected the credentials (unauthorized): "
                             "check REGISTRY_AUTH_FILE or REGISTRY_USERNAME/REGISTRY_PASSWORD")
    assert wrong not in outcome.output
    assert not auth_registry.has_manifest(*repo_name(target))


def test_registry_username_is_for_the_service_registry_only(built, auth_registry):
    """REGISTRY_USERNAME/REGISTRY_PASSWORD belong to REGISTRY_URL (the temp image's host), not to a job's target."""
    user, password = auth_registry.auth
    built.payload.update(publish_targets=[f"{auth_registry.host}/hello:{built.id}"],
                         insecure_registries=[auth_registry.host])
    outcome = built.run("publish", REGISTRY_USERNAME=user, REGISTRY_PASSWORD=password)
    assert outcome.returncode != 0
    assert f"registry {auth_registry.host} requires credentials" in outcome.error
    assert password not in outcome.output


def test_tls_verification_stays_on_for_a_registry_the_service_did_not_list(built, auth_registry, tmp_path):
    user, password = auth_registry.auth
    built.payload["publish_targets"] = [f"{auth_registry.host}/hello:{built.id}"]  # plain http, not listed
    outcome = built.run("publish", JOBFORGE_REGISTRY_AUTH_FILE=auth_file(tmp_path, {auth_registry.host: (user, password)}))
    assert outcome.returncode != 0
    # The first command that talks to the unlisted registry keeps TLS verification on (and so fails here).
    target = re.escape(f"docker://{auth_registry.host}/")
    assert re.search(r"--(dest-)?tls-verify=true\b[^\n]*" + target, outcome.stdout), outcome.stdout
    assert "HTTP response to HTTPS client" in outcome.output
    assert not auth_registry.has_manifest("hello", built.id)


def test_from_images_of_unlisted_registries_are_pulled_with_tls_verification(make_job, tmp_path, auth_registry):
    """REGISTRY_TLS_VERIFY=false (payload tls_verify) covers the service's registry only, not a FROM host a
    Dockerfile names: that one is still spoken to over verified TLS unless JOBFORGE_INSECURE_REGISTRIES lists it."""
    repo = GitRepo.create(tmp_path / "from-elsewhere", {"Dockerfile": f"FROM {auth_registry.host}/busybox:latest\n"})
    job = make_job(f"file://{repo.path}")
    refused = job.run("build")
    assert refused.returncode != 0 and "HTTP response to HTTPS client" in refused.output
    job.payload["insecure_registries"] = [auth_registry.host]
    listed = job.run("build")  # now over plain http: the registry answers, and wants credentials
    assert listed.returncode != 0 and "HTTPS client" not in listed.output
    assert "unauthorized" in listed.output.lower() or "authentication required" in listed.output.lower()


def test_publish_without_credentials_says_they_are_needed(built, auth_registry):
    built.payload.update(publish_targets=[f"{auth_registry.host}/hello:{built.id}"],
                         insecure_registries=[auth_registry.host])
    outcome = built.run("publish")
    assert outcome.returncode != 0
    assert f"registry {auth_registry.host} requires credentials" in outcome.error


# --- cleanup --------------------------------------------------------------------------------------------


def test_cleanup_keeps_a_temp_image_sharing_its_repository_with_a_target(built, registry):
    built.payload["publish_targets"] = [f"{registry.host}/temp-hello:keep-{built.id}"]
    outcome = ok(built.run("cleanup"))
    assert "WARNING: keeping" in outcome.stdout
    assert registry.has_manifest(*repo_name(built.temp_image))


# --- hostile inputs -------------------------------------------------------------------------------------


@pytest.fixture
def marker():
    path = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    yield path
    path.unlink(missing_ok=True)


def test_hostile_git_ref_is_not_executed(make_job, hello_repo, marker):
    outcome = make_job(f"file://{hello_repo.path}", git_ref=f"main; touch {marker}").run("build")
    assert outcome.returncode != 0
    assert outcome.error.startswith("ERROR: invalid git_ref")
    assert not marker.exists()


def test_hostile_build_arg_and_test_env_stay_literal(make_job, hello_repo, base_image, marker):
    greeting = f"$(touch {marker})"
    env_value = f"""a'b"c; touch {marker}; `touch {marker}`"""
    job = make_job(f"file://{hello_repo.path}", build_args={"BASE_IMAGE": base_image, "GREETING": greeting})
    job.payload["test"] = {"entry_point": True, "commands": ['printf "[%s]\\n" "$HOSTILE"'],
                           "env": {"HOSTILE": env_value}, "secret_env": []}
    ok(job.run("build"))
    test = ok(job.run("test"))
    assert f"{greeting}, world!" in test.stdout
    assert f"[{env_value}]" in test.stdout
    assert not marker.exists()


def test_secret_env_is_forwarded_but_never_printed(built):
    secret = f"tok-{uuid.uuid4().hex}"
    built.payload["test"] = {"entry_point": False, "commands": ['test "${#API_TOKEN}" = 36', 'echo "$API_TOKEN"'],
                             "env": {}, "secret_env": ["API_TOKEN"]}
    outcome = ok(built.run("test", JOBFORGE_SECRET_API_TOKEN=secret))
    assert secret not in outcome.output


def test_a_secret_mapping_never_copies_the_services_own_variable(built):
    """test.vault_secrets naming REGISTRY_PASSWORD gets the job's Vault value or nothing, never the service's."""
    secret = f"service-registry-pw-{uuid.uuid4().hex}"
    built.payload["test"] = {"entry_point": False, "commands": ['echo "got:$REGISTRY_PASSWORD"'],
                             "env": {}, "secret_env": ["REGISTRY_PASSWORD"]}
    outcome = built.run("test", REGISTRY_USERNAME="svc", REGISTRY_PASSWORD=secret)
    assert outcome.returncode != 0
    assert outcome.error == ("ERROR: secret REGISTRY_PASSWORD was not fetched for this job "
                             "(no JOBFORGE_SECRET_REGISTRY_PASSWORD in the task environment)")
    assert secret not in outcome.output and "got:" not in outcome.output


# Variables of the runner's (or the service's) environment: buildah hands the proxy ones to every RUN step when it
# has them (bud's --http-proxy default), the others are what a Nomad task or the service itself would carry.
RUNNER_ENV = ("HTTP_PROXY", "https_proxy", "FOO_SERVICE", "NOMAD_TASK_DIR", "JOBFORGE_GIT_PLAIN_HTTP_HOSTS")
# Prints the step's environment and every environment of its PID namespace it can read.
DUMP_ENV = "env; for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done; echo dumped-$((40+2))"


def test_build_steps_and_test_commands_see_nothing_of_the_runners_environment(make_job, tmp_path):
    markers = {name: f"http://{name.lower().replace('_', '-')}-{uuid.uuid4().hex}.invalid:3128" for name in RUNNER_ENV}
    dockerfile = f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN : {uuid.uuid4().hex}; {DUMP_ENV}\n"  # never a cached step
    repo = GitRepo.create(tmp_path / "dump", {"Dockerfile": dockerfile})
    job = make_job(f"file://{repo.path}")
    job.payload["test"] = {"entry_point": False, "commands": [DUMP_ENV], "env": {}, "secret_env": []}
    job.env.update(markers)
    for phase in ("build", "test"):
        outcome = ok(job.run(phase))
        assert "dumped-42" in outcome.stdout, outcome.output  # the dump ran
        assert not [name for name, value in markers.items() if value in outcome.output], outcome.output


ENV_DUMP = "env; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"


def test_the_control_nonce_never_reaches_a_build_step_or_a_test_command(make_job, tmp_path):
    """Whoever reads the nonce can forge the task's control lines: the script takes it out of its environment
    before any tool starts. The only line carrying it is the build's own cache report."""
    nonce = uuid.uuid4().hex
    repo = GitRepo.create(tmp_path / "envdump", {"Dockerfile": (
        f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN echo {uuid.uuid4().hex}; {ENV_DUMP}\n")})
    job = make_job(f"file://{repo.path}", test={"entry_point": False, "env": {}, "secret_env": [],
                                                 "commands": [ENV_DUMP]})
    build = ok(job.run("build", JOBFORGE_CONTROL_NONCE=nonce, NOMAD_META_control_nonce=nonce))
    test = ok(job.run("test", JOBFORGE_CONTROL_NONCE=nonce, NOMAD_META_control_nonce=nonce))
    assert "PATH=" in build.stdout and "PATH=" in test.stdout  # the environments were dumped
    assert [line for line in build.output.splitlines() if nonce in line] == [
        f'::jobforge-{nonce} cache {{"hits": 0, "misses": 1}}']
    assert nonce not in test.output


@pytest.mark.skipif(os.geteuid() != 0 and not os.access("/dev/net/tun", os.R_OK | os.W_OK),
                    reason="slirp4netns needs /dev/net/tun")
@pytest.mark.parametrize("network, interfaces", [("none", "lo"), ("outbound", "lo tap0")])
def test_test_commands_have_their_own_network_never_the_hosts_loopback(built, registry, network, interfaces):
    port = registry.host.rsplit(":", 1)[1]
    built.payload["test"] = {"entry_point": False, "env": {}, "secret_env": [], "network": network, "commands": [
        "echo interfaces: $(awk -F: 'NR > 2 {gsub(/ /, \"\", $1); print $1}' /proc/net/dev | sort)",
        f"wget -q -T 5 -O /dev/null http://127.0.0.1:{port}/v2/ && echo reach$((40+2)) || echo noreach$((40+2))"]}
    lines = ok(built.run("test")).stdout.splitlines()
    assert f"interfaces: {interfaces}" in lines and "noreach42" in lines  # the registry listens there


# --- layer cache ----------------------------------------------------------------------------------------


def test_clear_cache_really_disables_the_cache(make_job, tmp_path, base_image):
    repo = GitRepo.create(tmp_path / "cached", {"Dockerfile": (
        f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN echo {uuid.uuid4().hex} > /stamp\n")})
    url = f"file://{repo.path}"
    ok(make_job(url).run("build"))
    warm = ok(make_job(url).run("build"))
    assert "Using cache" in warm.stdout
    cleared = ok(make_job(url, clear_cache=True).run("build"))
    assert "Using cache" not in cleared.stdout


def test_the_cache_repository_receives_layers_and_a_cold_node_builds_from_it(make_job, tmp_path, registry,
                                                                              base_image):
    repo = GitRepo.create(tmp_path / "remote-cache", {"Dockerfile": (
        f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN echo {uuid.uuid4().hex} > /stamp\nRUN echo two > /two\n")})
    name = f"cache/app-{uuid.uuid4().hex[:8]}"
    url, cache = f"file://{repo.path}", f"{registry.host}/{name}"
    nonce = uuid.uuid4().hex  # the backend's, for the control line with the cache use
    first = ok(make_job(url, cache_repo=cache).run("build", JOBFORGE_CONTROL_NONCE=nonce))
    assert "Using cache" not in first.stdout
    assert f'::jobforge-{nonce} cache {{"hits": 0, "misses": 2}}' in first.stderr.splitlines()
    assert len(registry.tags(name)) == 3  # one cache image per step (two RUN, the job's label), in the temp registry

    # A node whose local store is empty: only the base image, pulled as the build does.
    cold_storage = BuildahStorage(root=tmp_path / "cold" / "root", runroot=tmp_path / "cold" / "runroot")
    cold = make_job(url, cache_repo=cache)
    cold.storage = cold_storage
    rebuilt = ok(cold.run("build", NOMAD_META_control_nonce=nonce))  # as a Nomad dispatch hands it over
    assert rebuilt.stdout.count(f"Cache pulled from remote {cache}:") == 2
    assert f'::jobforge-{nonce} cache {{"hits": 2, "misses": 0}}' in rebuilt.stderr.splitlines()
    opted_out = make_job(url, cache_repo=cache, clear_cache=True)
    opted_out.storage = cold_storage
    assert "--cache-from" not in ok(opted_out.run("build")).stdout


def test_the_local_store_is_pruned_least_recently_used_first_down_to_its_cap(make_job, tmp_path):
    storage = BuildahStorage(root=tmp_path / "own" / "root", runroot=tmp_path / "own" / "runroot")
    repos = [GitRepo.create(tmp_path / f"prune-{n}", {"Dockerfile": (
        f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN echo {uuid.uuid4().hex} > /stamp\n")}) for n in range(2)]
    jobs = [make_job(f"file://{repo.path}") for repo in repos]
    for job in jobs:
        job.storage = storage
    ok(jobs[0].run("build"))
    images = lambda: json.loads(subprocess.run(  # noqa: E731
        ["buildah", "--storage-driver", "vfs", "--root", str(storage.root), "--runroot", str(storage.runroot),
         "images", "--all", "--json", "--no-trunc"], capture_output=True, text=True, check=True).stdout or "[]")
    first = {i["id"].removeprefix("sha256:"): i["names"] or [] for i in images()}
    # Make every stored image look unused for two hours (beyond the window that protects concurrent builds).
    (storage.root / "jobforge-cache-uses.json").write_text(json.dumps({i: 0 for i in first}))
    jobs[1].payload.update(cache_max_bytes=1, cache_ttl=None)
    pruned = ok(jobs[1].run("build"))
    assert "least recently used image(s) from the layer cache" in pruned.stdout
    base = next(i for i, names in first.items() if jobs[0].payload["build_args"]["BASE_IMAGE"] in names)
    built = next(i for i, names in first.items() if jobs[0].temp_image in names)
    left = {i["id"].removeprefix("sha256:") for i in images()}
    assert built not in left
    assert left & set(first) == {base}  # of the old images, only this build's own base image stays


def test_the_cache_repository_gets_the_temp_registrys_credentials_only(make_job, hello_repo, registry,
                                                                         auth_registry):
    user, password = auth_registry.auth
    name = f"cache/hello-{uuid.uuid4().hex[:8]}"
    job = make_job(f"file://{hello_repo.path}", temp_image=f"{auth_registry.host}/temp-hello:{uuid.uuid4().hex}",
                   cache_repo=f"{auth_registry.host}/{name}", insecure_registries=[registry.host])
    outcome = ok(job.run("build", REGISTRY_USERNAME=user, REGISTRY_PASSWORD=password))
    assert auth_registry.tags(name)  # pushed with the temp registry's credentials
    assert password not in outcome.output


def test_image_without_a_shell_still_runs_its_entry_point(make_job, tmp_path, registry, base_image):
    # busybox copied out of the base image into an otherwise empty image: no /bin/sh to wrap the command with.
    repo = GitRepo.create(tmp_path / "shell-less", {"Dockerfile": (
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE} AS tools\n"
        "FROM scratch\nCOPY --from=tools /bin/busybox /busybox\n"
        'ENTRYPOINT ["/busybox", "echo"]\nCMD ["no shell here"]\n')})
    job = make_job(f"file://{repo.path}", test={"entry_point": True, "commands": [], "env": {}, "secret_env": []})
    ok(job.run("build"))
    outcome = ok(job.run("test"))
    assert "no shell here" in outcome.stdout.splitlines()
    assert "the image has no /bin/sh" in outcome.stdout


def test_test_output_is_complete_however_long(built):
    built.payload["test"]["commands"] = ["i=0; while [ $i -lt 30000 ]; do echo \"n $i\"; i=$((i+1)); done"]
    lines = ok(built.run("test")).stdout.splitlines()
    assert [line for line in lines if line.startswith("n ")] == [f"n {i}" for i in range(30000)]


# --- all or nothing on publish, and errors a user acts on ---------------------------------------------


class ReadOnlyRegistry(Registry):
    """A registry that serves reads and refuses every push (docker-registry's maintenance read-only mode)."""

    def _write_config(self):
        path = super()._write_config()
        path.write_text(path.read_text().replace("  maintenance:\n", "  maintenance:\n    readonly:\n      enabled: true\n"))
        return path


@pytest.fixture
def readonly_registry(tmp_path):
    with ReadOnlyRegistry(tmp_path / "ro-registry") as reg:
        yield reg


def test_a_publish_failing_part_way_rolls_back_what_it_changed(built, registry, readonly_registry, base_image):
    name = f"rollback-{built.id[:8]}"
    new, overwritten, blocked = (f"{registry.host}/{name}:{built.id}", f"{registry.host}/{name}:latest",
                                 f"{readonly_registry.host}/{name}:v1")
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                    f"docker://{base_image}", f"docker://{overwritten}"], check=True, capture_output=True)
    old = registry.manifest_digest(name, "latest")
    built.payload["publish_targets"] = [new, overwritten, blocked]
    built.payload["insecure_registries"] = [readonly_registry.host]  # plain http, as the service would list it
    outcome = built.run("publish")
    assert outcome.returncode != 0
    assert outcome.error.startswith(f"ERROR: publish stopped at {blocked}: copy to {blocked} failed")
    assert outcome.error.endswith(f"rolled back: {new}, {overwritten}")
    assert registry.tags(name) == ["latest"] and registry.manifest_digest(name, "latest") == old


def test_a_target_already_at_the_digest_is_kept_and_cleanup_removes_a_failed_publish(built, registry):
    name = f"kept-{built.id[:8]}"
    targets = [f"{registry.host}/{name}:{built.id}", f"{registry.host}/{name}:stable"]
    built.payload["publish_targets"] = targets[:1]
    ok(built.run("publish"))
    built.payload["publish_targets"] = targets
    again = ok(built.run("publish"))
    assert f"{targets[0]} is already at" in again.stdout
    # The job failed later on: its cleanup removes what is still published at its digest, then the temp image.
    built.payload["rollback_targets"] = targets
    ok(built.run("cleanup"))
    assert registry.tags(name) == [] and not registry.has_manifest(*repo_name(built.temp_image))


def test_a_missing_repository_is_named_without_its_credentials(make_job, tmp_path, git_http_server):
    missing = make_job(f"file://{tmp_path}/no-such-repo").run("build")
    assert missing.error == f"ERROR: repository not found or not readable: file://{tmp_path}/no-such-repo"
    url = git_http_server.url.replace("http://", "http://someone:hunter2@") + "/absent.git"
    over_http = make_job(url).run("build")
    assert over_http.error.startswith("ERROR: repository not found or not readable: http://127.0.0.1")
    assert "hunter2" not in over_http.output and "someone@" not in over_http.error
