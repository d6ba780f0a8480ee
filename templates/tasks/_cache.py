"""The build phase's layer cache (stdlib only): cache hits counted from buildah's output and the local store's
pruning plan (least recently used first); the registry cache's relay into the build's namespace is _relay.py.

Two caches: buildah's local `--layers` store, and the cache repository in the temp registry
(`--cache-from`/`--cache-to`), which a node whose local store is empty (another Nomad client, a wiped disk)
builds from. Both are bounded: `cache_ttl` (buildah ignores older layers; pruning removes unnamed ones) and
`cache_max_bytes` (the local store is pruned to it before each build, least recently used images first).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

USES_FILE = "jobforge-cache-uses.json"  # in the storage root: image id -> last time a build used it
MAX_USES = 10_000
RECENT_SECONDS = 3600  # never pruned: another build on the same store may be about to use it
_STEP = re.compile(r"^STEP \d+/\d+: (\S+)(.*)")
OWN_LABEL = "jobforge.job-id"  # the build's per-job label: a step of its own, never cached, so never counted
_USED = re.compile(r"^--> Using cache ([0-9a-f]{64})\b")
_COMMITTED = re.compile(r"^--> ([0-9a-f]{11,64})$")
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kKMGTP]?B)\s*$")
_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}


# --- hits ------------------------------------------------------------------------------------------------


class HitCounter:
    """Counts a `buildah bud --layers` run's cacheable steps (every STEP but FROM and our own label) and those it took from a
    cache (`--> Using cache <id>`, local or pulled from the cache repository); keeps the image ids it used."""

    def __init__(self) -> None:
        self.steps = 0
        self.hits = 0
        self.used: list[str] = []

    def feed(self, line: str) -> None:
        line = line.strip()
        step = _STEP.match(line)
        if step:
            own = step.group(1).upper() == "LABEL" and step.group(2).strip().startswith(f'"{OWN_LABEL}"=')
            self.steps += step.group(1).upper() != "FROM" and not own
        elif used := _USED.match(line):
            self.hits += 1
            self.used.append(used.group(1))
        elif committed := _COMMITTED.match(line):
            self.used.append(committed.group(1))

    @property
    def misses(self) -> int:
        return max(0, self.steps - self.hits)


def report(counter: HitCounter) -> None:
    """The control line the backend turns into the cache hit metrics (docs/metrics.md)."""
    from _common import control_line  # noqa: PLC0415 - a sibling script: on sys.path once build.py runs
    control_line("cache", {"hits": counter.hits, "misses": counter.misses})


# --- the local store: least recently used first -----------------------------------------------------------


@dataclass(frozen=True)
class StoredImage:
    id: str
    names: tuple[str, ...]
    size: int
    created: float


def parse_size(text: str) -> int:
    """buildah's human size (`2.13 MB`, decimal units) in bytes; 0 when unreadable."""
    match = _SIZE.match(text or "")
    if not match or match.group(2) not in _UNITS:
        return 0
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_images(text: str) -> list[StoredImage]:
    """`buildah images --all --json --no-trunc` output."""
    images = []
    for item in json.loads(text or "[]") or []:
        images.append(StoredImage(id=str(item.get("id", "")).removeprefix("sha256:"),
                                  names=tuple(item.get("names") or ()), size=parse_size(item.get("size", "")),
                                  created=float(item.get("created") or 0)))
    return images


def names_of(ref: str) -> set[str]:
    """The names a Dockerfile's image reference can be stored under (`alpine` is
    `docker.io/library/alpine:latest`)."""
    name, _, digest = ref.partition("@")
    tagged = name if digest or name.rfind(":") > name.rfind("/") else f"{name}:latest"
    names = {ref, tagged}
    first = tagged.split("/", 1)[0]
    if "/" not in tagged or not ("." in first or ":" in first or first == "localhost"):
        names.add(f"docker.io/{tagged if '/' in tagged else 'library/' + tagged}")
    return names


def named(images: Iterable[StoredImage], refs: Iterable[str]) -> list[str]:
    """Ids of the images stored under any name of `refs`."""
    wanted = set().union(*(names_of(r) for r in refs)) if refs else set()
    return [i.id for i in images if wanted.intersection(i.names)]


def prune_plan(images: Iterable[StoredImage], uses: Mapping[str, float], now: float, ttl: float | None,
               max_bytes: int | None, keep: Iterable[str] = (), recent: float = RECENT_SECONDS) -> list[str]:
    """The ids to remove, in order: unnamed images (cached layers) not used within `ttl`, then the least recently
    used images until the store's size is at most `max_bytes`. An image's last use is its recorded use or, if
    none, its creation; images named in `keep` (this build's base images) and images used within `recent`
    seconds (what concurrent builds on the same store are using) are never chosen."""
    images = list(images)
    kept = set(named(images, list(keep)))
    candidates = sorted((i for i in images if i.id not in kept and now - uses.get(i.id, i.created) >= recent),
                        key=lambda i: (uses.get(i.id, i.created), i.id))
    total = sum(i.size for i in images)
    plan = []
    for image in candidates:
        expired = ttl is not None and not image.names and now - uses.get(image.id, image.created) > ttl
        if expired or (max_bytes is not None and total > max_bytes):
            plan.append(image.id)
            total -= image.size
    return plan


def read_uses(root: str | None) -> dict[str, float]:
    if not root:
        return {}
    try:
        with open(os.path.join(root, USES_FILE), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


def record_uses(root: str | None, ids: Iterable[str], images: Iterable[StoredImage], now: float) -> None:
    """Stamp `ids` (full or short) as used now; forget images no longer stored; replace the file atomically
    (concurrent builds on one store may lose a stamp, never corrupt the file)."""
    if not root:
        return
    stored = {i.id for i in images}
    uses = {k: v for k, v in read_uses(root).items() if k in stored}
    for short in ids:
        for full in stored:
            if full.startswith(short):
                uses[full] = now
    newest = dict(sorted(uses.items(), key=lambda kv: kv[1])[-MAX_USES:])
    path = os.path.join(root, USES_FILE)
    tmp = f"{path}.{os.getpid()}"
    with contextlib.suppress(OSError):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(newest, fh)
        os.replace(tmp, path)


def now() -> float:
    return time.time()
