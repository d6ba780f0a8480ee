"""The API tokens file (``JOBFORGE_API_TOKENS_FILE``), re-read whenever it changes.

Each request costs one `stat`; the file is parsed again only when its inode, size, mtime or ctime differ, so an
edit (or an atomic rename over it) takes effect on the next request without a restart or a timer. A file that
disappears or cannot be read fails closed: no token is accepted until it is readable again.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from jobforge.auth import TokenEntry, parse_tokens
from jobforge.errors import ConfigError

log = logging.getLogger("jobforge.server.tokens")

_Stamp = tuple[int, int, int, int]


class TokenFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: _Stamp | None = None
        self._entries: list[TokenEntry] = []
        self._failed = False

    def load(self) -> "TokenFile":
        """First read, at startup: an unreadable file is a configuration error (the service does not start)."""
        try:
            self._read(os.stat(self.path))
        except OSError as exc:
            raise ConfigError(f"cannot read JOBFORGE_API_TOKENS_FILE {self.path}: {exc.strerror}",
                              [{"field": "JOBFORGE_API_TOKENS_FILE", "rule": "must be a readable file"}]) from None
        if not self._entries:
            log.warning("%s holds no valid token: every API call is refused until one is added", self.path)
        return self

    def entries(self) -> list[TokenEntry]:
        """The current tokens (re-read first when the file changed)."""
        try:
            st = os.stat(self.path)
            if _stamp(st) != self._stamp:
                self._read(st)
        except OSError as exc:
            if not self._failed:
                log.error("cannot read API tokens file %s (%s): refusing every token until it is readable",
                          self.path, exc.strerror)
            self._failed, self._stamp, self._entries = True, None, []
        return self._entries

    def _read(self, st: os.stat_result) -> None:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        entries, problems = parse_tokens(text)
        for problem in problems:
            log.warning("%s line %d ignored: %s", self.path, problem.line, problem.rule)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by group or others (mode %o); chmod 600 it", self.path,
                        stat.S_IMODE(st.st_mode))
        self._stamp, self._entries, self._failed = _stamp(st), entries, False
        log.info("loaded %d API token(s) from %s", len(entries), self.path)


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
