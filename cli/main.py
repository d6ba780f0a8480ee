"""``jobforge``: submit, watch and inspect Job Forge builds.

Exit codes: 0 success, 1 the job failed (or the service failed the request), 2 usage or validation error
(nothing was sent), 3 the service is unreachable, 4 the service refused the API token (401) or the token may not
act for that owner (403), 130 interrupted. Options work before and after positionals; ``--url`` and ``--token``
work anywhere. Only `jobforge.client` talks to the service.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Literal

from cyclopts import App, Parameter, validators

from jobforge_cli import merge, output, submit, versioning
from jobforge_cli.watch import follow_logs, watch_job
from jobforge.client import Client, discover_url
from jobforge.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    JobForgeError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
)

EXIT_JOB_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_AUTHORISED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
PhaseName = Literal["build", "test", "publish"]
StatusName = Literal["PENDING", "BUILDING", "TESTING", "PUBLISHING", "SUCCEEDED", "FAILED"]


def _version() -> str:
    try:
        return version("jobforge")
    except PackageNotFoundError:
        return "0.0.0+source"


app = App(
    name="jobforge",
    help="Build a git repo into a container image, test it and publish it, on a Job Forge service.",
    help_epilogue="Exit codes: 0 ok, 1 job failed, 2 usage/validation error, 3 service unreachable, "
                  "4 API token refused (401) or not allowed for that owner (403).",
    version=_version,
    default_parameter=Parameter(negative=()),
)


@dataclass
class Context:
    """Global options, handed to every command by the launcher (cyclopts meta app)."""

    url: str | None = None
    token: str | None = None

    def client(self) -> Client:
        url, source = discover_url(self.url)
        return Client(url, source=source, token=self.token)


Ctx = Annotated[Context, Parameter(parse=False)]
JobId = Annotated[str, Parameter(help="Job id, as printed by submit-job.")]
Human = Annotated[bool, Parameter(help="Human-readable text instead of JSON.")]
Json = Annotated[bool, Parameter(help="JSON instead of human-readable text.")]
DeployDir = Annotated[Path, Parameter(help="Directory holding version.yaml (default ./deploy).")]


@app.command
def submit_job(
    config: Annotated[str | None, Parameter(help="Job config: a YAML/JSON file, inline YAML/JSON, "
                                                 "or '-'/omitted for stdin.")] = None,
    /, *,
    global_: Annotated[str | None, Parameter(name="--global", help="Global config merged under CONFIG "
                                                                   "(mappings deep-merged, lists replaced).")] = None,
    image_tags: Annotated[list[str] | None, Parameter(consume_multiple=False,
                                                      help="Extra tags, comma-separated; repeatable.")] = None,
    watch: Annotated[bool, Parameter(help="Follow the job live until it ends; exit 1 if it failed.")] = False,
    history: Annotated[bool, Parameter(help="Record the build under <deploy_dir>/builds and history.md.")] = False,
    no_version: Annotated[bool, Parameter(help="Do not add or bump the BRANCH-vX.Y.Z version tag.")] = False,
    dry_run: Annotated[bool, Parameter(help="Print the merged, validated config (secrets redacted); "
                                            "send nothing.")] = False,
    json: Annotated[bool, Parameter(help="Machine output: with --watch, progress goes to stderr and the "
                                         "final status JSON to stdout; with --dry-run, JSON instead of YAML.")] = False,
    ctx: Ctx,
) -> int:
    """Submit a build -> test -> publish job; prints {"job_id", "status"} as JSON.

    Example: jobforge submit-job --global deploy/global.yaml build.yaml --image-tags latest --watch
    """
    return submit.run(ctx.client, source=config, global_file=global_, image_tags=image_tags, watch=watch,
                      history=history, no_version=no_version, dry_run=dry_run, json_out=json)


@app.command
def get_status(job_id: JobId, /, *, human: Human = False, ctx: Ctx) -> int:
    """Status, phase timings, tags and redacted config of a job (JSON)."""
    with ctx.client() as client:
        job = client.get_status(job_id)
    output.show(output.status_text(job)) if human else output.emit_json(job)
    return 0


@app.command
def get_logs(job_id: JobId, phase: Annotated[PhaseName | None, Parameter(help="Only this phase.")] = None, /, *,
             follow: Annotated[bool, Parameter(help="Stream new lines until the job ends.")] = False,
             human: Human = False, ctx: Ctx) -> int:
    """Logs of a job per phase (JSON); --human prints plain lines, --follow streams them live."""
    with ctx.client() as client:
        if follow:
            return follow_logs(client, job_id, phase, sys.stdout)
        logs = client.get_logs(job_id, phase=phase)
    output.show(output.logs_text(logs, phase)) if human else output.emit_json(logs)
    return 0


@app.command
def kill_job(job_id: JobId, /, *, human: Human = False, ctx: Ctx) -> int:
    """Stop a pending or running job; it ends FAILED with 'killed by user'."""
    with ctx.client() as client:
        result = client.kill_job(job_id)
    output.show(f"{result.job_id}: {result.status.value} ({result.message})") if human else output.emit_json(result)
    return 0


@app.command
def cleanup(job_id: JobId, /, *, human: Human = False, ctx: Ctx) -> int:
    """Delete a finished job's temporary image and scratch files (safe to repeat)."""
    with ctx.client() as client:
        result = client.cleanup(job_id)
    text = f"{result.job_id}: cleaned {', '.join(result.cleaned) or 'nothing'}"
    output.show(text) if human else output.emit_json(result)
    return 0


@app.command
def get_history(
    limit: Annotated[int, Parameter(validator=validators.Number(gte=1, lte=1000), help="Jobs per page.")] = 10,
    offset: Annotated[int, Parameter(validator=validators.Number(gte=0), help="Jobs to skip.")] = 0,
    /, *,
    owner: Annotated[str | None, Parameter(help="Only jobs of this owner.")] = None,
    status: Annotated[StatusName | None, Parameter(help="Only jobs in this status.")] = None,
    human: Human = False, ctx: Ctx,
) -> int:
    """Jobs newest first (JSON: {"jobs", "total", "limit", "offset"})."""
    with ctx.client() as client:
        result = client.get_history(limit, offset, owner=owner, status=status)
    output.show(output.history_text(result)) if human else output.emit_json(result)
    return 0


@app.command
def health(*, json: Json = False, ctx: Ctx) -> int:
    """Liveness and readiness of the service; exit 1 when it is not ready."""
    with ctx.client() as client:
        live, ready = client.health(), client.ready()
    if json:
        print(f'{{"live": {live.model_dump_json()}, "ready": {ready.model_dump_json()}}}')
    else:
        output.show(output.health_text(live, ready))
    return 0 if ready.status == "ok" else EXIT_JOB_FAILED


@app.command
def watch(job_id: JobId, /, *, json: Json = False, ctx: Ctx) -> int:
    """Follow a job live (server push) until it ends; exit 0 succeeded, 1 failed. Ctrl-C stops watching only."""
    out = sys.stderr if json else sys.stdout
    with ctx.client() as client:
        code, job = watch_job(client, job_id, out=out, tty=out.isatty())
    if json and job is not None:
        output.emit_json(job)
    return code


@app.command
def version_info(*, deploy_dir: DeployDir = Path("deploy"), json: Json = False) -> int:
    """Current version, branch and the tag the next submission gets."""
    branch = versioning.current_branch()
    current, nxt, tag = versioning.peek(deploy_dir, branch)
    if json:
        import json as _json
        print(_json.dumps({"version": str(current), "branch": branch, "next_version": str(nxt), "next_tag": tag}))
    else:
        print(f"version:  {current}\nbranch:   {branch or '-'}\nnext tag: {tag}")
    return 0


@app.command
def version_major(n: Annotated[int, Parameter(validator=validators.Number(gte=0), help="New major.")], /, *,
                  deploy_dir: DeployDir = Path("deploy")) -> int:
    """Set the major version: N.0.0 (the next submission is N.0.1)."""
    print(versioning.set_version(deploy_dir, major=n))
    return 0


@app.command
def version_minor(n: Annotated[int, Parameter(validator=validators.Number(gte=0), help="New minor.")], /, *,
                  deploy_dir: DeployDir = Path("deploy")) -> int:
    """Set the minor version: M.N.0 (the next submission is M.N.1)."""
    print(versioning.set_version(deploy_dir, minor=n))
    return 0


@app.meta.default
def _launcher(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    url: Annotated[str | None, Parameter(name=["--url", "-u"], help="Service URL (else JOB_SERVICE_URL, else "
                                         "Consul service jobforge-service via CONSUL_HTTP_ADDR, else "
                                         "http://localhost:8080).")] = None,
    token: Annotated[str | None, Parameter(name=["--token"], help="API bearer token (else JOBFORGE_TOKEN). "
                                           "Prefer JOBFORGE_TOKEN: other local users can read a command "
                                           "line.")] = None,
) -> int:
    command, bound, ignored = app.parse_args(tokens)
    extra = {name: Context(url=url, token=token) for name in ignored}
    return command(*bound.args, **bound.kwargs, **extra)


# The reference (Go flag package) spelled long options with one dash; accept those spellings too. A lone "-"
# (stdin) would parse as an option, so it travels as a token no shell can produce (argv cannot hold NUL).
_ARGV_ALIASES = {"-global": "--global", "-url": "--url", "-token": "--token", "-watch": "--watch",
                 "-history": "--history",
                 "-": merge.STDIN}


def run(argv: list[str]) -> int:
    """Run the CLI and map the exception tree to exit codes."""
    try:
        return app.meta([_ARGV_ALIASES.get(a, a) for a in argv], result_action="return_value") or 0
    except ServiceUnavailable as exc:
        output.error(exc.message)
        return EXIT_UNREACHABLE
    except Unauthorized as exc:
        output.error(f"the service refused the request: {exc.message}; pass a valid API token with --token or "
                     "JOBFORGE_TOKEN (the service's operator issues them)")
        return EXIT_NOT_AUTHORISED
    except Forbidden as exc:
        output.error(f"not allowed: {exc.message}")
        return EXIT_NOT_AUTHORISED
    except ConfigError as exc:
        output.error(exc.message, exc.errors)
        return EXIT_USAGE
    except (NotFound, Conflict, PayloadTooLarge) as exc:
        output.error(exc.message)
        return EXIT_USAGE
    except JobForgeError as exc:
        output.error(exc.message)
        return EXIT_JOB_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def main() -> None:
    sys.exit(run(sys.argv[1:]))
