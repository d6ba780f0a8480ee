"""A loopback HTTP listener that answers every request with 401 + `WWW-Authenticate: Basic` and records what
it received: a stand-in for a hostile git server or registry that a job config points at."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EMPTY_BASIC = "Basic Og=="  # base64(":")


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def _challenge(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        with self.server.lock:
            self.server.requests.append((self.command, self.path, dict(self.headers.items())))
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="listener"')
        if self.path.startswith("/v2"):
            self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _challenge

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - base class signature
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class ChallengeListener:
    """`with ChallengeListener() as listener:` ... `listener.requests`, `listener.credentials_seen()`."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.requests = []
        self._server.lock = threading.Lock()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    @property
    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        with self._server.lock:
            return list(self._server.requests)

    def credentials_seen(self) -> list[str]:
        """Every Authorization / Proxy-Authorization value received that carries a credential.

        containers/image answers a Basic challenge it has no credential for with an empty `Basic Og==`
        (base64 of ':'): that is no credential, so it is not listed."""
        return [value for _, _, headers in self.requests for name, value in headers.items()
                if name.lower() in ("authorization", "proxy-authorization") and value != EMPTY_BASIC]

    def raw(self) -> str:
        """Everything received (methods, paths, headers), for asserting that no secret arrived in any form."""
        return repr(self.requests)

    def __enter__(self) -> "ChallengeListener":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
