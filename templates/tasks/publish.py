#!/usr/bin/env python3
"""Publish phase: copy the temp image to every publish target, then prove they all share one digest.

`skopeo copy --preserve-digests` refuses to rewrite manifests, so a target's digest equals the temp
image's; we still re-read every target's manifest and hash it ourselves before printing `Published:`.
"""

from __future__ import annotations

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    CommandFailed, Context, TaskError, capture, failure, is_unauthorized, main, registry_authfile, run,
    step, tls_for, unauthorized_error,
)


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
        for target in targets:
            step(f"copying {source} -> {target}")
            copy(ctx, source, target, authfile)
        step("verifying digests")
        expected = manifest_digest(ctx, source, authfile)
        digests = {target: manifest_digest(ctx, target, authfile) for target in targets}
    wrong = [f"{target}@{digest}" for target, digest in digests.items() if digest != expected]
    if wrong:
        raise TaskError(f"digest mismatch: expected {expected}, got {', '.join(wrong)}")
    for target in targets:
        print(f"Published: {target}@{expected}", flush=True)


if __name__ == "__main__":
    main(publish)
