#!/usr/bin/env python3
"""Build phase: clone `repo_url` at `git_ref`, `buildah bud` the Dockerfile, push to `temp_image`.

Prints `digest: sha256:…` of the pushed temp image. Git credentials reach git only through a credential
helper written for this run that answers for exactly one origin (scheme + host + port), the one
`git_credential_for` bound the credential to; its values come from the environment, never from argv. A
password in `repo_url` itself is taken out of the URL and handled the same way (bound to that URL's origin).

The RUN steps run in `sandbox()` namespaces with outbound network but no route to the host's loopback, so the
images the Dockerfile names are pulled before (out here, with the registry credentials) and the build itself
never pulls (`--pull=never`) nor sees a credential.

Layer cache (templates/tasks/_cache.py): `--layers` in the local store, plus `--cache-from`/`--cache-to` the
payload's `cache_repo` in the temp registry, with the temp registry's credentials only; a registry on this
machine's loopback is relayed into the sandbox's namespace through a filter that forwards only that cache
repository's requests (templates/tasks/_relay.py). `clear_cache` opts out of both.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cache  # noqa: E402
import _relay  # noqa: E402
from _common import (  # noqa: E402
    NETWORK_NONE, NETWORK_RUNNER, CommandFailed, Context, Credential, TaskError, capture, containers_lease,
    failure, git_credential_for, is_ssh_url, is_unauthorized, main, origin_of, private_file, registry_authfile,
    registry_host, repository, run, sandbox, ssh_command, step, tls_for, tool_env, unauthorized_error,
)

GIT_ALLOW_PROTOCOL = "file:git:http:https:ssh"
# Safe-by-default git: no stored credential helpers, no askpass, no hooks, no prompts.
GIT = ["git", "-c", "credential.helper=", "-c", "core.askPass=", "-c", "core.hooksPath=/dev/null",
       "-c", "advice.detachedHead=false"]
# git runs the helper with `get` and the request (protocol=, host=, ...) on stdin; it answers only for the one
# origin its credential is bound to (a redirect to another host gets nothing). Values come from the environment.
CREDENTIAL_HELPER = """#!/bin/sh
[ "$1" = get ] || exit 0
protocol= host=
while IFS= read -r line && [ -n "$line" ]; do
  case "$line" in protocol=*) protocol=${line#protocol=} ;; host=*) host=${line#host=} ;; esac
done
[ "$protocol" = %(protocol)s ] && [ "$host" = %(host)s ] || exit 0
printf 'username=%%s\\npassword=%%s\\n' "$JOBFORGE_GIT_CRED_USERNAME" "$JOBFORGE_GIT_CRED_PASSWORD"
"""
BUILD_ARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What git says when the repository is missing or refuses us (local paths, smart HTTP, ssh).
UNREADABLE_REPO = re.compile(
    r"does not appear to be a git repository|repository .*not found|not found|could not read from remote"
    r"|returned error: 40[134]|\b40[134]\b|could not read (username|password)|terminal prompts disabled"
    r"|permission denied|access denied", re.IGNORECASE)
AUTH_FAILED = re.compile(r"authentication failed|invalid username or password", re.IGNORECASE)
HOST_KEY_FAILED = re.compile(r"host key verification failed", re.IGNORECASE)
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
_MOUNT_FROM = re.compile(r"(?:^|,)from=([^,]+)")


def public_url(url: str) -> str:
    """The URL without user info (credentials), for messages."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def fetch_error(url: str, output: str) -> TaskError:
    """Name the cause in words a user acts on, not git's last line."""
    if HOST_KEY_FAILED.search(output):
        return TaskError(f"git fetch of {public_url(url)} failed: the ssh server's host key is not one of the "
                         "known hosts (field known_hosts of the job's git_credentials_path, or the runner's "
                         "/etc/ssh/ssh_known_hosts)")
    if AUTH_FAILED.search(output):
        return TaskError(f"git fetch of {public_url(url)} failed: authentication failed (check the git "
                         "credentials configured for this host: JOBFORGE_GIT_CREDENTIALS, JOBFORGE_GIT_USERNAME)")
    if UNREADABLE_REPO.search(output) or AUTH_FAILED.search(output):
        return TaskError(f"repository not found or not readable: {public_url(url)}")
    return failure(f"git fetch of {public_url(url)} failed", output)


def split_url_credential(url: str) -> tuple[str, Credential | None]:
    """(the URL without a password, the credential it carried bound to the URL's own origin).

    A URL without a password is returned unchanged; a password in a non-http(s) URL is dropped (masked)."""
    parts = urllib.parse.urlsplit(url) if "://" in url else None
    if parts is None or parts.password is None:
        return url, None
    host_port = parts.netloc.rpartition("@")[2]
    clean = urllib.parse.urlunsplit(parts._replace(netloc=host_port))
    origin = origin_of(clean)
    if origin is None:
        return clean, None
    return clean, Credential(origin, urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password))


def git_env(ctx: Context, credential: Credential | None) -> dict[str, str]:
    """tool_env() (the tools' allow-list: no credential, no setting of the service) + no system/global git config
    (it could add helpers, insteadOf rewrites or extra headers) + the one credential bound to this repository's
    origin, if any."""
    env = dict(tool_env(), GIT_ALLOW_PROTOCOL=GIT_ALLOW_PROTOCOL, GIT_TERMINAL_PROMPT="0",
               GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    # No job key: ssh offers no key at all (the runner's keys, config and agent stay the runner's).
    env["GIT_SSH_COMMAND"] = ssh_command(None, os.path.join(ctx.workdir, ".git-known-hosts"), strict=False)
    if credential is not None:
        env["JOBFORGE_GIT_CRED_USERNAME"] = credential.username
        env["JOBFORGE_GIT_CRED_PASSWORD"] = credential.password
    return env


def git_argv(ctx: Context, url: str, credential: Credential | None) -> list[str]:
    """GIT, plus the credential helper for `url`'s origin when a credential is bound to it."""
    if credential is None:
        return list(GIT)
    netloc = urllib.parse.urlsplit(url).netloc.lower()  # git sends host[:port] as written in the URL
    helper = private_file(os.path.join(ctx.workdir, ".git-credential-helper"), CREDENTIAL_HELPER % {
        "protocol": shlex.quote(credential.origin.scheme), "host": shlex.quote(netloc)})
    os.chmod(helper, 0o700)
    return GIT + ["-c", f"credential.helper=!{shlex.quote(helper)}"]


@contextlib.contextmanager
def ssh_identity(ctx: Context, url: str):
    """{GIT_SSH_COMMAND: …} offering the job's own key (Vault `ssh_key`) when `url` is fetched over ssh, else {}.

    The key sits in a 0600 file of the phase workdir for the fetch only; argv shows its path, never its text."""
    if not (ctx.git_ssh_key and is_ssh_url(url)):
        yield {}
        return
    key = private_file(os.path.join(ctx.workdir, ".git-ssh-key"), ctx.git_ssh_key.strip() + "\n")
    known = private_file(os.path.join(ctx.workdir, ".git-known-hosts"), (ctx.git_known_hosts or "").strip() + "\n")
    if not ctx.git_known_hosts:
        step("the job's git credentials have no known_hosts: the ssh host key is accepted on first use")
    try:
        yield {"GIT_SSH_COMMAND": ssh_command(key, known, strict=bool(ctx.git_known_hosts))}
    finally:
        for path in (key, known):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def validate_url(url: str) -> None:
    """A leading '-' would read as an option to git or ssh; other schemes are stopped by GIT_ALLOW_PROTOCOL."""
    if url.startswith("-") or any(ord(c) < 32 for c in url):
        raise TaskError(f"invalid repo_url {url!r}")


def validate_ref(ref: str) -> None:
    """Refuse refs that are not ref names or shas before they reach git (e.g. `--upload-pack=…`)."""
    bad = not ref or ref.startswith("-") or any(c.isspace() or ord(c) < 32 for c in ref)
    if bad or subprocess.run(["git", "check-ref-format", "--allow-onelevel", ref],
                             stdin=subprocess.DEVNULL, check=False).returncode != 0:
        raise TaskError(f"invalid git_ref {ref!r}: not a branch, tag or commit name")


def checkout(ctx: Context, url: str, ref: str, dest: str, credential: Credential | None = None) -> str:
    """Shallow-fetch `ref` when the server allows it, else fetch everything and resolve it locally.

    `url` carries no password (see split_url_credential); `credential` is offered to its origin only."""
    validate_url(url)
    validate_ref(ref)
    with ssh_identity(ctx, url) as ssh_env:
        return _checkout(ctx, url, ref, dest, dict(git_env(ctx, credential), **ssh_env),
                         git_argv(ctx, url, credential))


def _checkout(ctx: Context, url: str, ref: str, dest: str, env: dict[str, str], git: list[str]) -> str:
    if os.path.exists(dest):
        shutil.rmtree(dest)
    step(f"fetching {public_url(url)} at {ref}")
    for what, argv in (("git init", ["init", "-q", "--", dest]),
                       ("git remote add", ["-C", dest, "remote", "add", "--", "origin", url])):
        result = run(ctx, git + argv, env=env)
        if result.returncode != 0:
            raise failure(f"{what} failed", result.output)
    shallow = run(ctx, git + ["-C", dest, "fetch", "--depth", "1", "--no-tags", "--", "origin", ref], env=env)
    if shallow.returncode == 0:
        commit = "FETCH_HEAD"
    else:
        step("shallow fetch not possible for this ref; fetching all branches and tags")
        full = run(ctx, git + ["-C", dest, "fetch", "--tags", "--", "origin",
                               "+refs/heads/*:refs/remotes/origin/*"], env=env)
        if full.returncode != 0:
            raise fetch_error(url, full.output)
        commit = resolve_ref(ctx, dest, ref, env, git)
    step("checking out")
    result = run(ctx, git + ["-C", dest, "checkout", "-q", "--detach", commit], env=env)
    if result.returncode != 0:
        raise failure(f"git checkout of {ref!r} failed", result.output)
    sha = run(ctx, git + ["-C", dest, "rev-parse", "HEAD"], env=env, quiet=True).output.strip()
    print(f"commit: {sha}", flush=True)
    return sha


def resolve_ref(ctx: Context, repo: str, ref: str, env: dict[str, str], git: list[str]) -> str:
    if ref.startswith("refs/heads/"):
        candidates = ["refs/remotes/origin/" + ref[len("refs/heads/"):]]
    else:
        candidates = [f"refs/remotes/origin/{ref}", f"refs/tags/{ref}", ref]
    for candidate in candidates:
        found = run(ctx, git + ["-C", repo, "rev-parse", "--verify", "--quiet", candidate + "^{commit}"],
                    env=env, quiet=True)
        if found.returncode == 0:
            return found.output.strip()
    raise TaskError(f"git_ref {ref!r} not found in the repository")


def inside(root: str, relative: str, field: str, want_dir: bool) -> str:
    """Resolve `relative` under the clone, refusing absolute paths and symlinks that escape it."""
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, relative))
    if os.path.isabs(relative) or os.path.commonpath([path, real_root]) != real_root:
        raise TaskError(f"{field} {relative!r} points outside the repository")
    if not (os.path.isdir(path) if want_dir else os.path.isfile(path)):
        raise TaskError(f"{field} {relative!r} does not exist in the repository")
    return path


def _instructions(text: str) -> list[list[str]]:
    """A Dockerfile's instructions as word lists: comments dropped, `\\` continuations joined."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped and not pending:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        words = (pending + stripped).split()
        pending = ""
        if words:
            result.append(words)
    return result


def _expand(word: str, args: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        return args.get(name) or (match.group(2) or "")
    return _VARIABLE.sub(value, word)


def base_images(text: str, build_args: dict[str, str]) -> list[str]:
    """The images a Dockerfile takes from registries (FROM, COPY/ADD --from, RUN --mount from=), with the
    global ARGs and the job's build args substituted; stage names, stage numbers and `scratch` are not images."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    images: list[str] = []

    def add(ref: str) -> None:
        if ref and ref.lower() not in stages and ref != "scratch" and not ref.isdigit() and ref not in images:
            images.append(ref)

    for words in _instructions(text):
        keyword, rest = words[0].upper(), words[1:]
        if keyword == "ARG" and not stages and not images:
            for spec in rest:
                name, has_default, default = spec.partition("=")
                args[name] = build_args.get(name, default.strip("\"'") if has_default else "")
        elif keyword == "FROM":
            plain = [w for w in rest if not w.startswith("--")]
            if plain:
                add(_expand(plain[0], args))
            if len(plain) >= 3 and plain[1].upper() == "AS":
                stages.add(plain[2].lower())
        elif keyword in ("COPY", "ADD"):
            for word in rest:
                if word.startswith("--from="):
                    add(_expand(word[len("--from="):], args))
        elif keyword == "RUN":
            for word in rest:
                if word.startswith("--mount="):
                    add(next((m.group(1) for m in _MOUNT_FROM.finditer(word[len("--mount="):])), ""))
    return images


def dockerfile_base_images(ctx: Context, dockerfile: str) -> list[str]:
    with open(dockerfile, encoding="utf-8", errors="replace") as fh:
        return base_images(fh.read(), ctx.payload.get("build_args") or {})


def pull_base_images(ctx: Context, images: list[str], authfile: str | None) -> None:
    for image in images:
        step(f"pulling {image}")
        argv = ctx.buildah("pull", tls_for(ctx, "tls-verify", image))
        argv += ["--authfile", authfile] if authfile else []
        result = run(ctx, argv + ["--", image])
        if result.returncode != 0:
            if is_unauthorized(result.output):
                raise unauthorized_error(ctx, result.output, [image])
            raise failure(f"could not pull {image}", result.output)


def cache_repo(ctx: Context) -> str | None:
    """The registry cache repository this build reads and writes, None when the job opted out (`clear_cache`)."""
    return None if ctx.payload.get("clear_cache") else ctx.payload.get("cache_repo") or None


def cache_ttl(ctx: Context) -> float | None:
    ttl = ctx.payload.get("cache_ttl")
    return float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else None


def bud_argv(ctx: Context, dockerfile: str, context: str, authfile: str | None = None,
             cache: str | None = None) -> list[str]:
    """`cache`: the registry cache repository (`--cache-from`/`--cache-to`); bud talks to no other registry
    (`--pull=never`), so `authfile` (the temp registry's credentials only) and the TLS flag are for it alone."""
    p = ctx.payload
    # --force-rm: a failed or killed build must not leave its working container in the shared storage.
    argv = ctx.buildah("bud", "--layers", "--force-rm", "--pull=never", "--isolation", ctx.isolation,
                       "-f", dockerfile)
    for name, value in (p.get("build_args") or {}).items():
        if not BUILD_ARG_NAME.match(name):
            raise TaskError(f"invalid build arg name {name!r}")
        argv += ["--build-arg", f"{name}={value}"]
    if p.get("target"):
        argv += ["--target", p["target"]]
    image_format = p.get("image_format") or "oci"
    if image_format not in ("oci", "docker"):
        raise TaskError(f"invalid image_format {image_format!r}: oci or docker")
    argv += ["--format", image_format]
    if p.get("clear_cache"):
        argv.append("--no-cache")
    if cache:
        argv += ["--cache-from", cache, "--cache-to", cache, tls_for(ctx, "tls-verify", cache)]
        argv += ["--authfile", authfile] if authfile else []
    if cache_ttl(ctx):
        argv += ["--cache-ttl", f"{int(cache_ttl(ctx))}s"]
    # A per-job label keeps temp digests unique, so cleanup's delete-by-digest never hits another job's tag.
    argv += ["--label", f"jobforge.job-id={p.get('job_id', '')}"]
    return argv + ["-t", ctx.payload["temp_image"], context]


def cache_route(ctx: Context, bases: list[str]):
    """(cache repository or None, the sandbox's `inside` hook): a registry on this machine's loopback is out of
    the sandbox's reach, so it is relayed in, for buildah only and its cache repository's traffic only (and
    layer mounts from the `bases` it pulled from there); without network, a remote one is out of reach: no
    registry cache."""
    cache = cache_repo(ctx)
    if not cache or ctx.build_network == NETWORK_RUNNER:
        return cache, None
    host = registry_host(cache)
    if _relay.is_loopback(_relay.split_host_port(host)[0]):
        if ctx.tls_verify_for(cache):
            step(f"no registry layer cache: {host} is on this machine's loopback and verified over TLS, which "
                 "the build's relay cannot filter (a plain-HTTP registry there needs REGISTRY_TLS_VERIFY=false "
                 "or JOBFORGE_INSECURE_REGISTRIES)")
            return None, None
        mount_from = [repository(b).split("/", 1)[1] for b in bases if "/" in b and registry_host(b) == host]
        return cache, _relay.Relay(host, repository(cache).split("/", 1)[1], mount_from)
    if ctx.build_network == NETWORK_NONE:
        step("no registry layer cache: builds have no network (JOBFORGE_BUILD_NETWORK=none)")
        return None, None
    return cache, None


def stored_images(ctx: Context) -> list[_cache.StoredImage]:
    try:
        return _cache.parse_images(capture(ctx, ctx.buildah("images", "--all", "--json", "--no-trunc")).decode())
    except (CommandFailed, ValueError):
        return []


def stamp_and_prune(ctx: Context, used: list[str], names: list[str]) -> None:
    """After the build: stamp what it used (the layers it took or made, its base images and its own image), then
    bound the local store for the next builds: unnamed layers unused for `cache_ttl`, then the least recently
    used images until it is at most `cache_max_bytes`. What a build used within the hour, this one's included,
    is never taken (another build may be using it); an image a container still uses is skipped."""
    images = stored_images(ctx)
    now = _cache.now()
    _cache.record_uses(ctx.root, [*used, *_cache.named(images, names)], images, now)
    if ctx.payload.get("clear_cache"):
        return
    max_bytes = ctx.payload.get("cache_max_bytes")
    max_bytes = int(max_bytes) if isinstance(max_bytes, int) and max_bytes > 0 else None
    if max_bytes is None and cache_ttl(ctx) is None:
        return
    plan = _cache.prune_plan(images, _cache.read_uses(ctx.root), now, cache_ttl(ctx), max_bytes, names)
    if plan:
        step(f"pruning {len(plan)} least recently used image(s) from the layer cache")
    for image_id in plan:
        run(ctx, ctx.buildah("rmi", image_id), quiet=True)


def build(ctx: Context) -> None:
    url, ref, temp = ctx.require("repo_url"), ctx.require("git_ref"), ctx.require("temp_image")
    url_password = urllib.parse.urlsplit(url).password if "://" in url else None
    if url_password:
        ctx.secrets += [url_password, urllib.parse.unquote(url_password)]
    url, url_credential = split_url_credential(url)
    credential = url_credential or git_credential_for(url, ctx.git_credentials, ctx.git_plain_http_hosts)
    clone = os.path.join(ctx.workdir, "src")
    checkout(ctx, url, ref, clone, credential)
    dockerfile = inside(clone, ctx.payload.get("dockerfile_path") or "Dockerfile", "dockerfile_path", False)
    context = inside(clone, ctx.payload.get("dockerfile_context") or ".", "dockerfile_context", True)

    bases = dockerfile_base_images(ctx, dockerfile)
    with registry_authfile(ctx, [temp]) as authfile:
        if ctx.payload.get("clear_cache"):
            step("clearing the layer cache")
            if run(ctx, ctx.buildah("rmi", "--prune")).returncode != 0:
                raise TaskError("could not clear the layer cache (buildah rmi --prune failed)")
        pull_base_images(ctx, bases, authfile)
        cache, netns_hook = cache_route(ctx, bases)
        step(f"building {temp}" + (f" (layer cache: {cache})" if cache else ""))
        hits = _cache.HitCounter()
        # The lease sweeps what killed builds left (bud keeps its working container when killed mid-step).
        with containers_lease(ctx), sandbox(ctx.build_network, netns_hook) as prefix:
            if netns_hook is not None and netns_hook.failed:
                step(f"no registry layer cache: cannot relay {registry_host(cache)} into the build's network "
                     f"namespace ({netns_hook.failed})")
                cache = None
            result = run(ctx, prefix + bud_argv(ctx, dockerfile, context, authfile, cache), cwd=clone,
                         watch=hits.feed)
        _cache.report(hits)
        if result.returncode != 0:
            stamp_and_prune(ctx, hits.used, bases)
            raise failure(f"image build failed (exit {result.returncode})", result.output)
        step(f"pushing {temp}")
        digest_file = os.path.join(ctx.workdir, "digest")
        push = ctx.buildah("push", tls_for(ctx, "tls-verify", temp), "--digestfile", digest_file,
                           "--authfile", authfile)
        result = run(ctx, push + [temp, f"docker://{temp}"])
        if result.returncode != 0:
            if is_unauthorized(result.output):
                raise unauthorized_error(ctx, result.output, [temp])
            raise failure(f"push of {temp} failed (exit {result.returncode})", result.output)
    with open(digest_file, encoding="utf-8") as fh:
        digest = fh.read().strip()
    stamp_and_prune(ctx, hits.used, [*bases, temp])
    print(f"digest: {digest}", flush=True)


if __name__ == "__main__":
    main(build)
