"""The build phase's layer cache (stdlib only): the registry cache's relay into the build's network namespace,
cache hits counted from buildah's output, and the local store's pruning plan (least recently used first).

Two caches: buildah's local `--layers` store, and the cache repository in the temp registry
(`--cache-from`/`--cache-to`), which a node whose local store is empty (another Nomad client, a wiped disk)
builds from. Both are bounded: `cache_ttl` (buildah ignores older layers; pruning removes unnamed ones) and
`cache_max_bytes` (the local store is pruned to it before each build, least recently used images first).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

USES_FILE = "jobforge-cache-uses.json"  # in the storage root: image id -> last time a build used it
MAX_USES = 10_000
RECENT_SECONDS = 3600  # never pruned: another build on the same store may be about to use it
MAX_RELAY_CONNECTIONS = 64
_CLONE_NEWNET = 0x40000000
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


# --- the registry relay -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """`host` (no port) names this machine's loopback: unreachable from a sandbox's own network namespace."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(host_port: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit() or "]" in port:
        return host_port.strip("[]"), 443
    return host.strip("[]"), int(port)


def _listen_in(netns: str, port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:`port` inside the network namespace at `netns` (setns is per thread:
    a short-lived thread enters the namespace, opens the socket there and ends)."""
    result: dict[str, object] = {}

    def enter() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(16)
            result["sock"] = sock
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=enter, name="relay-setns", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["sock"]  # type: ignore[return-value]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _serve(listener: socket.socket, target: tuple[str, int], slots: threading.BoundedSemaphore) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # closed: the build is over
        if not slots.acquire(blocking=False):
            conn.close()
            continue
        try:
            upstream = socket.create_connection(target, timeout=30)
            upstream.settimeout(None)
        except OSError:
            conn.close()
            slots.release()
            continue

        def both(conn=conn, upstream=upstream) -> None:
            back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
            back.start()
            _pump(conn, upstream)
            back.join()
            conn.close()
            upstream.close()
            slots.release()

        threading.Thread(target=both, daemon=True).start()


class Relay:
    """The sandbox's `inside` hook for a registry on this machine's loopback; `failed` says why it could not be set
    up (then the build goes without the registry cache)."""

    def __init__(self, host_port: str) -> None:
        self.host_port = host_port
        self.failed: str | None = None

    @contextlib.contextmanager
    def __call__(self, netns: str) -> Iterator[None]:
        try:
            listening = relay(netns, self.host_port)
            listening.__enter__()
        except OSError as exc:
            self.failed = exc.strerror or str(exc)
            yield
            return
        try:
            yield
        finally:
            listening.__exit__(None, None, None)


@contextlib.contextmanager
def relay(netns: str, host_port: str) -> Iterator[None]:
    """Inside the build's network namespace, 127.0.0.1:<port> of the registry `host_port` (on this machine's
    loopback) is relayed to it: only that one port, and only while the build runs (docs/security.md)."""
    host, port = split_host_port(host_port)
    listener = _listen_in(netns, port)
    target = ("127.0.0.1" if host == "localhost" else host, port)
    thread = threading.Thread(target=_serve, args=(listener, target, threading.BoundedSemaphore(MAX_RELAY_CONNECTIONS)),
                              name="registry-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def now() -> float:
    return time.time()
