#!/usr/bin/env python3
"""Cleanup: delete the temp image's manifest from the registry; idempotent (already gone is success).

The registry API deletes a manifest by digest, which removes every tag in that repository pointing at
it, so we refuse when a publish target lives in the temp image's own repository.

A job whose publish failed passes its targets as `rollback_targets`: those still at the temp image's digest
(only this job's publish can have put them there: the digest is unique per job) are deleted first, finishing a
rollback the publish phase could not complete (registry down).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    CommandFailed, Context, TaskError, capture, failure, is_unauthorized, main, registry_authfile,
    repository, run, step, tls_for, unauthorized_error,
)

GONE = re.compile(r"manifest unknown|name unknown|\b404\b", re.IGNORECASE)


def present(ctx: Context, ref: str, authfile: str) -> bool:
    argv = ["skopeo", "inspect", "--raw", tls_for(ctx, "tls-verify", ref), "--authfile", authfile]
    try:
        capture(ctx, argv + [f"docker://{ref}"])
    except CommandFailed as exc:
        if GONE.search(exc.output):
            return False
        if is_unauthorized(exc.output):
            raise unauthorized_error(ctx, exc.output, [ref]) from exc
        raise failure(f"cannot check {ref}", exc.output) from exc
    return True


def digest_of(ctx: Context, ref: str, authfile: str) -> str | None:
    argv = ["skopeo", "inspect", "--raw", tls_for(ctx, "tls-verify", ref), "--authfile", authfile]
    try:
        raw = capture(ctx, argv + [f"docker://{ref}"])
    except CommandFailed as exc:
        if GONE.search(exc.output):
            return None
        raise failure(f"cannot check {ref}", exc.output) from exc
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def remove_rolled_back(ctx: Context, temp: str, targets: list[str], authfile: str) -> None:
    digest = digest_of(ctx, temp, authfile)
    if digest is None:
        return
    for repo in dict.fromkeys(repository(t) for t in targets):
        if any(digest_of(ctx, t, authfile) == digest for t in targets if repository(t) == repo):
            step(f"removing the failed publish from {repo}")
            ref = f"{repo}@{digest}"
            result = run(ctx, ["skopeo", "delete", tls_for(ctx, "tls-verify", ref), "--authfile", authfile,
                               f"docker://{ref}"])
            if result.returncode != 0 and not GONE.search(result.output):
                raise failure(f"could not remove the failed publish from {repo}", result.output)


def cleanup(ctx: Context) -> None:
    temp = ctx.require("temp_image")
    rollback = ctx.payload.get("rollback_targets") or []
    if rollback:
        with registry_authfile(ctx, [temp, *rollback]) as authfile:
            remove_rolled_back(ctx, temp, rollback, authfile)
    shared = [t for t in ctx.payload.get("publish_targets") or [] if repository(t) == repository(temp)]
    if shared:
        print(f"WARNING: keeping {temp}: deleting its manifest would also untag {', '.join(shared)}",
              flush=True)
        return
    with registry_authfile(ctx, [temp]) as authfile:
        step(f"deleting {temp}")
        argv = ["skopeo", "delete", tls_for(ctx, "tls-verify", temp), "--authfile", authfile]
        deleted = run(ctx, argv + [f"docker://{temp}"])
        step("verifying it is gone")
        if present(ctx, temp, authfile):
            if deleted.returncode != 0:
                raise failure(f"could not delete {temp}", deleted.output)
            raise TaskError(f"{temp} is still present after delete")
    if deleted.returncode != 0:
        print(f"{temp} was already gone", flush=True)
    print(f"deleted temp image {temp}", flush=True)


if __name__ == "__main__":
    main(cleanup)
