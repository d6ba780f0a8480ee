"""`python -m jobforge.smoke` (`make smoke`): one real build through a running cluster, written up for the record.

It finds the service as the CLI does (``--url``, ``JOB_SERVICE_URL``, else the Consul catalog at
``CONSUL_HTTP_ADDR``), submits a build of the given repository (build -> test -> publish), follows it to its end
over the watch stream, and writes ``<results-dir>/<UTC timestamp>/``:

- ``summary.json``: where the service was found, the job's final status and error, each phase's status, attempt,
  start, end and duration, the total time, and the published images with the digests the registry serves
  (``skopeo inspect``);
- ``logs/<phase>.log``: each phase's log.

It talks to the service only through jobforge.client. ``--token`` (or ``JOBFORGE_TOKEN``) is sent as
``Authorization: Bearer`` on every API call. The exit status is 0 only when the job succeeded and every
published tag has a digest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from jobforge.client import Client
from jobforge.client._discovery import endpoint
from jobforge.errors import JobForgeError
from jobforge.models import JobStatusResult

__all__ = ["main", "run_smoke"]

FOLLOW_POLL_SECONDS = 2.0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobforge.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="git URL (or path) of the repository to build")
    parser.add_argument("--image", required=True, help="image name to publish, e.g. smoke/hello")
    parser.add_argument("--registry", required=True, help="registry host[:port] to publish to")
    parser.add_argument("--git-ref", default="main")
    parser.add_argument("--dockerfile", default="Dockerfile", help="path of the Dockerfile in the repository")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="build argument (repeatable), e.g. BASE_IMAGE=127.0.0.1:5000/busybox:latest")
    parser.add_argument("--tag", action="append", default=[], help="extra image tag (repeatable)")
    parser.add_argument("--test-command", action="append", default=[],
                        help="test command run in the built image (repeatable); default: the image's entry point")
    parser.add_argument("--owner", default="smoke-test")
    parser.add_argument("--url", help="service URL (else JOB_SERVICE_URL, else the Consul catalog)")
    parser.add_argument("--token", default=os.environ.get("JOBFORGE_TOKEN"),
                        help="API token (default $JOBFORGE_TOKEN), sent as Authorization: Bearer")
    parser.add_argument("--results-dir", type=Path, default=Path("test_results"))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job's end")
    parser.add_argument("--registry-tls-verify", action=argparse.BooleanOptionalAction, default=True,
                        help="verify TLS when reading digests (--no-registry-tls-verify for a plain-HTTP registry)")
    args = parser.parse_args(argv)
    for item in args.build_arg:
        if "=" not in item or not item.split("=", 1)[0]:
            parser.error(f"--build-arg {item!r}: expected NAME=VALUE")
    return args


def job_config(args: argparse.Namespace) -> dict[str, Any]:
    test = {"commands": args.test_command} if args.test_command else {"entry_point": True}
    return {"owner": args.owner, "repo_url": args.repo, "git_ref": args.git_ref, "image_name": args.image,
            "registry_url": args.registry, "dockerfile_path": args.dockerfile, "image_tags": args.tag,
            "build_args": dict(item.split("=", 1) for item in args.build_arg), "test": test}


def follow(client: Client, job_id: str, timeout: float) -> JobStatusResult:
    """The job's final status: from the watch stream; polled when the stream is refused (e.g. no token support)."""
    deadline = time.monotonic() + timeout
    try:
        last = None
        for update in client.watch(job_id):
            last = update.job or last
            if update.type == "end" and update.job is not None:
                return update.job
            if time.monotonic() > deadline:
                break
        if last is not None and last.status.terminal:
            return last
    except JobForgeError as exc:
        print(f"smoke: watch unavailable ({exc}); polling the status", file=sys.stderr)
    while time.monotonic() < deadline:
        status = client.get_status(job_id)
        if status.status.terminal:
            return status
        time.sleep(FOLLOW_POLL_SECONDS)  # only when the push stream is unavailable
    raise TimeoutError(f"job {job_id} did not end within {timeout:.0f} s")


def image_digest(reference: str, tls_verify: bool) -> tuple[str | None, str | None]:
    """(digest, error) of `reference` as the registry serves it; skopeo reads REGISTRY_AUTH_FILE for credentials."""
    result = subprocess.run(["skopeo", "inspect", f"--tls-verify={'true' if tls_verify else 'false'}",
                             "--format", "{{.Digest}}", f"docker://{reference}"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return None, (result.stderr.strip().splitlines() or ["skopeo inspect failed"])[-1][:300]
    return result.stdout.strip(), None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def summarize(final: JobStatusResult, *, url: str, source: str, started: datetime, finished: datetime,
              images: list[dict[str, Any]], log_lines: dict[str, int]) -> dict[str, Any]:
    return {
        "service_url": url,
        "discovered_from": source,
        "job_id": final.job_id,
        "status": final.status.value,
        "failed_phase": final.failed_phase.value if final.failed_phase else None,
        "error": final.error,
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "wall_seconds": round((finished - started).total_seconds(), 3),
        "job_seconds": final.metrics.total_duration,
        "phases": {phase.value: {"status": p.status.value, "attempt": p.attempt, "started_at": _iso(p.started_at),
                                 "ended_at": _iso(p.ended_at), "duration_seconds": p.duration,
                                 "error": p.error, "log_lines": log_lines.get(phase.value, 0)}
                   for phase, p in final.phases.items()},
        "images": images,
    }


def _results_dir(base: Path, started: datetime) -> Path:
    """`<base>/<UTC timestamp>/logs`, with a counter if a run in the same second took the name."""
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 100):
        out = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            (out / "logs").mkdir(parents=True)
            return out
        except FileExistsError:
            continue
    raise FileExistsError(f"too many runs named {stamp} in {base}")


def _write(out: Path, summary: dict[str, Any]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def run_smoke(args: argparse.Namespace) -> tuple[int, Path]:
    started = datetime.now(UTC)
    out = _results_dir(args.results_dir, started)
    try:
        url, source = endpoint(args.url, "--url" if args.url else None)
    except JobForgeError as exc:  # not even found: still leave a record of the attempt
        _write(out, {"status": "ERROR", "error": str(exc), "started_at": started.isoformat()})
        raise
    session = requests.Session()
    if args.token:
        session.headers["Authorization"] = f"Bearer {args.token}"
    job_id = None
    try:
        with Client(url, source=source, session=session) as client:
            job_id = client.submit_job(job_config(args)).job_id
            print(f"smoke: job {job_id} submitted to {url} ({source})", file=sys.stderr)
            final = follow(client, job_id, args.timeout)
            logs = client.get_logs(job_id).logs
    except (JobForgeError, TimeoutError) as exc:
        _write(out, {"status": "ERROR", "error": str(exc), "job_id": job_id, "service_url": url,
                     "discovered_from": source, "started_at": started.isoformat()})
        raise
    finished = datetime.now(UTC)
    for phase, lines in logs.items():
        (out / "logs" / f"{phase}.log").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    images = []
    if final.status.value == "SUCCEEDED":
        for tag in final.image_tags:
            reference = f"{args.registry}/{args.image}:{tag}"
            digest, error = image_digest(reference, args.registry_tls_verify)
            images.append({"reference": reference, "digest": digest, **({"error": error} if error else {})})
    summary = summarize(final, url=url, source=source, started=started, finished=finished, images=images,
                        log_lines={phase: len(lines) for phase, lines in logs.items()})
    _write(out, summary)
    ok = final.status.value == "SUCCEEDED" and bool(images) and all(i["digest"] for i in images)
    return (0 if ok else 1), out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        code, out = run_smoke(args)
    except (JobForgeError, TimeoutError) as exc:
        print(f"smoke: {exc}", file=sys.stderr)
        return 2
    print(f"smoke: {'passed' if code == 0 else 'FAILED'}; results in {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
