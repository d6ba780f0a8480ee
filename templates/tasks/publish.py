#!/usr/bin/env python3
"""Publish phase: copy the temp image to every publish target, then prove they all share one digest.

`skopeo copy --preserve-digests` refuses to rewrite manifests, so a target's digest equals the temp
image's; we still re-read every target's manifest and hash it ourselves before printing `Published:`.

Fast: the targets' digests are read concurrently, each repository's targets are copied in order (the first copy
brings the blobs, later tags find them there) while different repositories are copied concurrently, and the
final verification reads every target concurrently.

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
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    CommandFailed, Context, TaskError, Terminated, capture, failure, is_unauthorized, main, registry_authfile,
    repository, run, step, tls_for, unauthorized_error,
)

GONE = re.compile(r"manifest unknown|name unknown|\b404\b", re.IGNORECASE)
MAX_PARALLEL = 8  # registry commands at once
T = TypeVar("T")
R = TypeVar("R")


def parallel(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`fn` over `items` on at most MAX_PARALLEL threads; results (or the first error) in the items' order."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(items))) as pool:
        return list(pool.map(fn, items))


def by_repository(targets: list[str]) -> list[list[str]]:
    """Targets grouped by repository, in their order (a repository's first target first)."""
    groups: dict[str, list[str]] = {}
    for target in targets:
        groups.setdefault(repository(target), []).append(target)
    return list(groups.values())


class Copies:
    """Copies `source` to each repository's targets in order, repositories concurrently. A repository's chain
    stops at its first failure or once `stop` is set; the others run to their end, so what was touched is
    known exactly (`started`, `done`) whatever fails where."""

    def __init__(self, ctx: Context, source: str, authfile: str) -> None:
        self.ctx, self.source, self.authfile = ctx, source, authfile
        self.started: set[str] = set()
        self.done: set[str] = set()
        self.failed: dict[str, TaskError] = {}
        self.stop = threading.Event()

    def chain(self, targets: list[str]) -> None:
        for target in targets:
            if self.stop.is_set():
                return
            step(f"copying {self.source} -> {target}")
            self.started.add(target)
            try:
                copy(self.ctx, self.source, target, self.authfile)
            except TaskError as exc:
                self.failed[target] = exc
                return
            self.done.add(target)

    def run(self, chains: list[list[str]]) -> None:
        pool = ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(chains))))
        try:
            for future in [pool.submit(self.chain, chain) for chain in chains]:
                future.result()
        except BaseException:
            self.stop.set()  # stopped (SIGTERM): no chain starts another copy
            raise
        finally:
            pool.shutdown(wait=True)


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
        step("reading the temp image's digest and the current digest of every target")
        read = parallel(lambda index_ref: (current_digest if index_ref[0] else manifest_digest)(
            ctx, index_ref[1], authfile), enumerate([source, *targets]))
        expected, before = read[0], dict(zip(targets, read[1:]))
        for target in targets:
            if before[target] == expected:
                step(f"{target} is already at {expected}; keeping it")
        copies = Copies(ctx, source, authfile)
        current = targets[0]
        try:
            copies.run(by_repository([t for t in targets if before[t] != expected]))
            failed = [t for t in targets if t in copies.failed]
            if failed:
                current = failed[0]
                raise copies.failed[current]
            current = "verification"
            step("verifying digests")
            digests = dict(zip(targets, parallel(lambda target: manifest_digest(ctx, target, authfile), targets)))
            wrong = [f"{target}@{digest}" for target, digest in digests.items() if digest != expected]
            if wrong:
                raise TaskError(f"digest mismatch: expected {expected}, got {', '.join(wrong)}")
        except (TaskError, Terminated) as exc:
            unfinished = [t for t in targets if t in copies.started and t not in copies.done]
            if isinstance(exc, Terminated) and unfinished:
                current = unfinished[0]
            touched = [t for t in targets if t in copies.started]
            for target in unfinished:
                try:  # did the failed copy change the target at all?
                    if current_digest(ctx, target, authfile) == before[target]:
                        touched.remove(target)
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
