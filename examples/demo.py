"""`make demo`: build, test and publish examples/hello through a real Job Forge service, on loopback only.

Steps: start a throw-away registry, seed a busybox base image into it, turn examples/hello into a git
repository, render examples/hello/build.yaml, start `jobforge-service`, then run the CLI as a user would:

    jobforge --url http://127.0.0.1:<port> submit-job build.yaml --watch

Everything lives in one temporary directory that is removed at the end (kept on failure, or with --keep).
The service and the registry are always stopped, also on failure and Ctrl-C. Exit status: 0 when the job
succeeded, 1 when it failed, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from jobforge.devinfra import Registry, ServiceProcess, git_repo_of, remove_tree, seed_busybox_image

ROOT = Path(__file__).resolve().parent.parent

EXAMPLE = ROOT / "examples" / "hello"
BIN = Path(sys.executable).parent  # the venv's bin: jobforge and jobforge-service live next to python
IMAGE = "hello"
# Settings from the caller's environment that would point the demo at something other than its own setup.
UNSET = ("REGISTRY_USERNAME", "REGISTRY_PASSWORD", "JOBFORGE_GIT_USERNAME", "JOBFORGE_GIT_PASSWORD",
         "GIT_USERNAME", "GIT_PASSWORD",
         "JOB_SERVICE_URL", "JOBFORGE_BACKEND", "REGISTRY_TEMP_PREFIX")


class DemoError(Exception):
    """A setup step failed; the message says which."""


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def detail(message: str) -> None:
    print(f"    {message}", flush=True)


def render_config(dest: Path, repo_url: str, registry_host: str) -> Path:
    text = (EXAMPLE / "build.yaml").read_text()
    text = text.replace("__REPO_URL__", repo_url).replace("__REGISTRY__", registry_host)
    dest.write_text(text)
    return dest


def latest_job(service: ServiceProcess) -> dict | None:
    """The newest job (this fresh service has seen only the demo's), as getStatus returns it."""
    request = urllib.request.Request(service.url + "/json/getHistory", data=json.dumps({"limit": 1}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        jobs = json.load(resp)["jobs"]
    return jobs[0] if jobs else None


def report(service: ServiceProcess, registry: Registry) -> bool:
    """Print the published references with their digests and the registry's tag list; True on success."""
    job = latest_job(service)
    if job is None:
        print("no job was submitted", file=sys.stderr)
        return False
    if job["status"] != "SUCCEEDED":
        say(f"Job {job['job_id']} ended {job['status']}"
            + (f" in {job['failed_phase']}" if job.get("failed_phase") else "")
            + (f": {job['error']}" if job.get("error") else ""))
        return False
    say("Published (digests as the registry serves them)")
    for tag in job["image_tags"]:
        digest = registry.manifest_digest(IMAGE, tag) or "(not found in the registry!)"
        detail(f"{registry.host}/{IMAGE}:{tag}@{digest}")
    say(f"Tags of {IMAGE} in the registry: {', '.join(registry.tags(IMAGE))}")
    missing = [tag for tag in job["image_tags"] if not registry.has_manifest(IMAGE, tag)]
    if missing:
        print(f"missing from the registry: {', '.join(missing)}", file=sys.stderr)
        return False
    return True


def run_demo(work: Path) -> int:
    for tool in ("jobforge", "jobforge-service"):
        if not (BIN / tool).exists():
            raise DemoError(f"{BIN / tool} not found: install the package first (`make demo` does)")
    started = time.monotonic()
    registry = Registry(work / "registry")
    service: ServiceProcess | None = None
    try:
        say("Starting a throw-away registry")
        registry.start()
        detail(f"{registry.url} (storage in {registry.dir})")

        base = f"{registry.host}/busybox:latest"
        say(f"Seeding the base image {base} from the host's busybox")
        buildah = work / "data" / "buildah"  # the containers-storage the service's local backend uses
        seed_busybox_image(registry.host, buildah / "root", buildah / "runroot")

        say("Making a git repository of examples/hello (branch main)")
        repo_url = git_repo_of(EXAMPLE, work / "hello")
        detail(repo_url)

        config = render_config(work / "build.yaml", repo_url, registry.host)
        say(f"Rendered the job config: {config}")

        say("Starting jobforge-service")
        # The demo's repository is the working copy the CLI tags, owned by whoever runs the demo; git lets only
        # its owner fetch it, so the phases run as that user, not as a separate build user
        # (docs/security.md: a real root service uses JOBFORGE_BUILD_USER).
        service = ServiceProcess(work / "data", registry.host, JOBFORGE_BUILD_USER="").start()
        detail(f"{service.url} (data dir {service.data_dir}, log {service.log_path})")

        say(f"Submitting the job: jobforge --url {service.url} submit-job {config.name} --watch")
        print(flush=True)
        # Run from the app's repository, as a user would: the CLI adds the branch version tag (main-v0.1.1).
        cli = [str(BIN / "jobforge"), "--url", service.url, "submit-job", str(config), "--watch"]
        env = {k: v for k, v in os.environ.items() if k not in UNSET}
        code = subprocess.run(cli, cwd=work / "hello", env=env, stdin=subprocess.DEVNULL).returncode
        print(flush=True)
        ok = report(service, registry) and code == 0
        if code != 0:
            say(f"jobforge exited with code {code}")
    except Exception:
        if service is not None:
            print(f"service log ({service.log_path}):\n{service.log_tail()}", file=sys.stderr)
        raise
    finally:
        say("Stopping the service and the registry")
        if service is not None:
            service.stop()
        registry.stop()
    say(f"{'Done' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, storage)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="jobforge-demo-"))
    code = 1
    try:
        code = run_demo(work)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:  # registry, seeding, git, HTTP
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    finally:
        if args.keep or code == 1:
            say(f"Kept {work} for inspection")
        else:
            remove_tree(work)
    return code


if __name__ == "__main__":
    sys.exit(main())
