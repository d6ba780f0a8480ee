"""Build throw-away git repositories for tests with the real `git` binary."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Mapping

# Fixed identity and no global/system config, so results do not depend on the machine.
_ENV = {
    "GIT_AUTHOR_NAME": "Job Forge Tests", "GIT_AUTHOR_EMAIL": "tests@jobforge.invalid",
    "GIT_COMMITTER_NAME": "Job Forge Tests", "GIT_COMMITTER_EMAIL": "tests@jobforge.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
}


class GitRepo:
    """A working repository: write files, commit, branch and tag; `bare_clone` it for serving."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | os.PathLike, files: Mapping[str, str | bytes] | None = None,
               branch: str = "main", executable: Iterable[str] = ()) -> "GitRepo":
        repo = cls(path)
        repo.path.mkdir(parents=True, exist_ok=True)
        repo.git("init", "-q", "-b", branch)
        if files:
            repo.write(files, executable)
            repo.commit("initial commit")
        return repo

    @classmethod
    def from_dir(cls, path: str | os.PathLike, source: str | os.PathLike, branch: str = "main") -> "GitRepo":
        """A repo whose first commit is a copy of `source` (file modes kept)."""
        shutil.copytree(source, path)
        repo = cls.create(path, branch=branch)
        repo.commit("import " + Path(source).name)
        return repo

    def git(self, *args: str) -> str:
        result = subprocess.run(["git", *args], cwd=self.path, env={**os.environ, **_ENV}, check=True,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True)
        return result.stdout.strip()

    def write(self, files: Mapping[str, str | bytes], executable: Iterable[str] = ()) -> None:
        for rel, content in files.items():
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        for rel in executable:
            (self.path / rel).chmod(0o755)

    def commit(self, message: str, files: Mapping[str, str | bytes] | None = None,
               executable: Iterable[str] = ()) -> str:
        """Stage everything (after writing `files`) and commit; returns the new commit sha."""
        if files:
            self.write(files, executable)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def branch(self, name: str, start: str = "HEAD") -> None:
        self.git("branch", name, start)

    def checkout(self, ref: str) -> None:
        self.git("checkout", "-q", ref)

    def tag(self, name: str, ref: str = "HEAD", message: str | None = None) -> None:
        """Lightweight tag, or annotated when `message` is given."""
        self.git("tag", *(["-a", "-m", message] if message else []), name, ref)

    def head(self) -> str:
        return self.rev_parse("HEAD")

    def rev_parse(self, ref: str) -> str:
        return self.git("rev-parse", "--verify", ref + "^{commit}")

    def bare_clone(self, dest: str | os.PathLike) -> Path:
        """A bare copy with every branch and tag, as a server would host it."""
        subprocess.run(["git", "clone", "-q", "--bare", "--", str(self.path), str(dest)], check=True,
                       env={**os.environ, **_ENV}, stdin=subprocess.DEVNULL, capture_output=True)
        return Path(dest)
