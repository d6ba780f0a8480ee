"""A real OpenSSH server on 127.0.0.1 for tests of git over ssh: it lets in the current user with one client key.

Started in the foreground (`sshd -D -e`) with its own host key and config, and ready when it logs that it listens
(read from its stderr, no sleeps). Its log keeps the fingerprint of every key it accepted.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import threading
from pathlib import Path

from jobforge.devinfra import free_port

SSHD = "/usr/sbin/sshd"  # openssh-server (Makefile APT_PACKAGES)


def keygen(path: Path) -> tuple[str, str]:
    """A new passphrase-less ed25519 key at `path`: (private key text, public key line)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "jobforge-test", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path.read_text(), path.with_suffix(".pub").read_text().strip()


def fingerprint(public_key_line: str) -> str:
    """`SHA256:…` of a public key, as sshd logs it."""
    out = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=public_key_line, capture_output=True, text=True,
                         check=True).stdout
    return out.split()[1]


class Sshd:
    """`with Sshd(root, authorized_key) as server:` server.port, server.host_key (public line), server.log()."""

    def __init__(self, root: Path, authorized_key: str) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        _, self.host_key = keygen(root / "host_key")
        (root / "authorized_keys").write_text(authorized_key + "\n")
        (root / "sshd_config").write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}", f"HostKey {root / 'host_key'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", f"PidFile {root / 'sshd.pid'}", "UsePAM no",
            "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", f"AllowUsers {getpass.getuser()}",
            "LogLevel VERBOSE", ""]))
        self._lines: list[str] = []
        self._proc: subprocess.Popen | None = None

    @property
    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key}"

    def log(self) -> str:
        return "".join(self._lines)

    def __enter__(self) -> Sshd:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege-separation directory
        self._proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._lines.append(line)
            if "Server listening on 127.0.0.1" in line:
                break
        else:
            raise RuntimeError(f"sshd did not start: {self.log()}")
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self._lines.append(line)

    def __exit__(self, *exc) -> None:
        assert self._proc is not None
        self._proc.terminate()
        self._proc.wait(timeout=30)
