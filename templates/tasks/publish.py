#!/usr/bin/env python3
"""Publish phase: copy the temp image to every publish target, then prove they all share one digest.

`skopeo copy --preserve-digests` refuses to rewrite manifests, so a target's digest equals the temp
image's; we still re-read every target's manifest and hash it ourselves before printing `Published:`.

All or nothing: each target's digest is read first; a target already at the temp image's digest is kept as it
is. When publishing fails part-way (or is stopped), what this run changed is rolled back: the job's manifest is
deleted from each repository it was pushed to and tags it overwrote are pointed back at their old digest. The
error names the target it stopped at and what was (not) rolled back; what could not be undone (registry down)
is removed by the cleanup phase once the registry is back (payload `rollback_targets`).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    CommandFailed, Context, TaskError, Terminated, capture, failure, is_unauthorized, main, registry_authfile,
    repository, run, step, tls_for, unauthorized_error,
)

GONE = re.compile(r"manifest unknown|name unknown|\b404\b", re.IGNORECASE)


def manifest_digest(ctx: Context, ref: str, authfile: str) -> str:
    """sha256 of the manifest bytes the registry serves for `ref` (the digest clients pull by)."""
    argv = ["skopeo", "inspect", "--raw", tls_for(ctx, "tls-verify", ref), "--authfile", authfile]
    try:
        raw = capture(ctx, argv + [f"docker://{ref}"])
    except CommandFailed as exc:
        if is_unauthorized(exc.output):
            raise unauthorized_error(ctx, exc.output, [ref]) from exc
        raise failure(f"cannot read the manifest of {ref}", exc.output) from exc
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def current_digest(ctx: Context, ref: str, authfile: str) -> str | None:
    """The digest `ref` points at now, None when the tag does not exist."""
    try:
        return manifest_digest(ctx, ref, authfile)
    except TaskError as exc:
        if GONE.search(str(exc)):
            return None
        raise


def skopeo_delete(ctx: Context, ref: str, authfile: str) -> bool:
    argv = ["skopeo", "delete", tls_for(ctx, "tls-verify", ref), "--authfile", authfile]
    result = run(ctx, argv + [f"docker://{ref}"])
    return result.returncode == 0 or bool(GONE.search(result.output))


def rollback(ctx: Context, touched: list[str], before: dict[str, str | None], digest: str,
             authfile: str) -> tuple[list[str], list[str]]:
    """Undo what this run did to `touched` targets; returns (rolled back, not rolled back)."""
    done, left = [], []
    for repo in dict.fromkeys(repository(t) for t in touched):
        mine = [t for t in touched if repository(t) == repo]
        # Deleting by digest removes every tag of the repository at that digest: skip if one was there before us.
        keeps = [t for t, d in before.items() if repository(t) == repo and d == digest]
        if keeps:
            left += [f"{t} (shares its digest with {', '.join(keeps)})" for t in mine]
            continue
        if not skopeo_delete(ctx, f"{repo}@{digest}", authfile):
            left += mine
            continue
        for target in mine:
            old = before.get(target)
            if old is None:
                done.append(target)
                continue
            source = f"{repo}@{old}"
            restore = run(ctx, ["skopeo", "copy", "--preserve-digests", tls_for(ctx, "src-tls-verify", source),
                                tls_for(ctx, "dest-tls-verify", target),
                                "--src-authfile", authfile, "--dest-authfile", authfile,
                                f"docker://{source}", f"docker://{target}"])
            (done if restore.returncode == 0 else left).append(target if restore.returncode == 0
                                                              else f"{target} (was {old})")
    return done, left


def copy(ctx: Context, source: str, target: str, authfile: str) -> None:
    argv = ["skopeo", "copy", "--preserve-digests", tls_for(ctx, "src-tls-verify", source),
            tls_for(ctx, "dest-tls-verify", target), "--src-authfile", authfile, "--dest-authfile", authfile]
    result = run(ctx, argv + [f"docker://{source}", f"docker://{target}"])
    if result.returncode != 0:
        if is_unauthorized(result.output):
            raise unauthorized_error(ctx, result.output, [target, source])
        raise failure(f"copy to {target} failed (exit {result.returncode})", result.output)


def publish(ctx: Context) -> None:
    source = ctx.require("temp_image")
    targets = ctx.payload.get("publish_targets") or []
    if not targets:
        raise TaskError("payload has no publish_targets")
    with registry_authfile(ctx, [source, *targets]) as authfile:
        expected = manifest_digest(ctx, source, authfile)
        step("reading the current digest of every target")
        before = {target: current_digest(ctx, target, authfile) for target in targets}
        touched: list[str] = []
        current = targets[0]
        try:
            for current in targets:
                if before[current] == expected:
                    step(f"{current} is already at {expected}; keeping it")
                    continue
                step(f"copying {source} -> {current}")
                touched.append(current)
                copy(ctx, source, current, authfile)
            current = "verification"
            step("verifying digests")
            digests = {target: manifest_digest(ctx, target, authfile) for target in targets}
            wrong = [f"{target}@{digest}" for target, digest in digests.items() if digest != expected]
            if wrong:
                raise TaskError(f"digest mismatch: expected {expected}, got {', '.join(wrong)}")
        except (TaskError, Terminated) as exc:
            if touched and touched[-1] == current:
                try:  # did the failed copy change the target at all?
                    if current_digest(ctx, current, authfile) == before[current]:
                        touched.pop()
                except TaskError:
                    pass  # unknown (registry down): roll it back too, to be sure
            if touched:
                step(f"publish failed at {current}; rolling back {', '.join(touched)}")
            done, left = rollback(ctx, touched, before, expected, authfile) if touched else ([], [])
            cause = str(exc) if isinstance(exc, TaskError) else "terminated by signal"
            message = f"publish stopped at {current}: {cause}; rolled back: {', '.join(done) or 'nothing'}"
            if left:
                message += f"; not rolled back yet (the cleanup removes them once the registry is back): {', '.join(left)}"
            raise TaskError(message) from None
    for target in targets:
        print(f"Published: {target}@{expected}", flush=True)


if __name__ == "__main__":
    main(publish)
