"""A minimal Debian base image with python3, made with `debootstrap` (no public base image is reachable here).

The packages come from the Debian mirror apt is configured with (the only network the machine reaches). A cache
directory (`JOBFORGE_DEBOOTSTRAP_CACHE`, default ~/.cache/jobforge/debootstrap) keeps the downloaded .debs and the
finished root filesystem tar (named after suite, packages and mirror) across runs, so only a machine's first run
waits for the mirror and dpkg (minutes); `JOBFORGE_DEBOOTSTRAP_FRESH=1` bootstraps anew. The root filesystem is
imported into buildah as one tar layer (ownership and modes kept) and pushed to a registry.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Not needed in an image, and half of its size.
PRUNE = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/locale", "usr/share/man",
         "usr/share/info")


def apt_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses for `SUITE` (deb822 .sources or one-line .list), else deb.debian.org."""
    override = os.environ.get("JOBFORGE_DEBIAN_MIRROR")
    if override:
        return override
    for path in sorted(sources_dir.glob("sources.list.d/*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
            if SUITE in fields.get("Suites", "").split() and "debian" in fields.get("URIs", ""):
                if not fields["URIs"].split()[0].endswith("-security"):
                    return fields["URIs"].split()[0]
    for path in [sources_dir / "sources.list", *sorted(sources_dir.glob("sources.list.d/*.list"))]:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                    return parts[1]
    return DEFAULT_MIRROR


def cache_dir() -> Path:
    return Path(os.environ.get("JOBFORGE_DEBOOTSTRAP_CACHE") or Path.home() / ".cache" / "jobforge" / "debootstrap")


def bootstrap_rootfs(target: Path) -> Path:
    """A tar of `debootstrap --variant=minbase` of SUITE with PACKAGES (in `target`, pruned), or the cached one."""
    cache = cache_dir().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    key = hashlib.sha256(f"{SUITE} {','.join(PACKAGES)} {mirror} {','.join(PRUNE)}".encode()).hexdigest()[:16]
    cached = cache / f"rootfs-{SUITE}-{key}.tar"
    if cached.exists() and not os.environ.get("JOBFORGE_DEBOOTSTRAP_FRESH"):
        return cached
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", f"--cache-dir={cache}",
            SUITE, str(target), mirror]
    if os.geteuid() != 0:  # rootless: debootstrap needs root in a user namespace
        argv = ["buildah", "unshare", *argv]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"debootstrap failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-2000:]}")
    for rel in PRUNE:
        shutil.rmtree(target / rel, ignore_errors=True)
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    with tarfile.open(partial, "w") as archive:
        archive.add(target, arcname=".")
    partial.replace(cached)  # atomic: a concurrent run sees a whole tar or none
    return cached


def push_base_image(rootfs_tar: Path, registry_host: str, storage_root: Path, runroot: Path,
                    name: str = "debian-python", tag: str = SUITE) -> str:
    """Import the rootfs tar as a one-layer image and push it (plain HTTP); returns the reference."""
    ref = f"{registry_host}/{name}:{tag}"
    buildah = ["buildah", "--storage-driver", "vfs", "--root", str(storage_root), "--runroot", str(runroot)]
    container = f"jobforge-debian-{uuid.uuid4().hex[:12]}"

    def sh(*args: str) -> None:
        result = subprocess.run(buildah + list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"buildah {args[0]} failed ({result.returncode}): {result.stderr.strip()}")

    sh("from", "--name", container, "scratch")
    try:
        sh("add", container, str(rootfs_tar), "/")
        sh("config", "--cmd", "/bin/bash", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           container)
        sh("commit", container, ref)
    finally:
        subprocess.run(buildah + ["rm", container], check=False, capture_output=True)
    sh("push", "--tls-verify=false", ref, f"docker://{ref}")
    return ref
