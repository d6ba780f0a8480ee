"""A real git smart-HTTP server: a threaded `http.server` that runs `git http-backend` as a CGI.

Serves the bare repositories under `root` at `<url>/<name>.git`, optionally behind HTTP basic auth.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .gitrepo import GitRepo

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
CHUNK = 64 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:
        self._cgi()

    def do_POST(self) -> None:
        self._cgi()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - base class signature
        pass  # quiet test output; git's own errors still reach stderr

    def _authorized(self) -> bool:
        if self.server.auth is None:
            return True
        expected = "Basic " + base64.b64encode(":".join(self.server.auth).encode()).decode()
        return self.headers.get("Authorization") == expected

    def _cgi(self) -> None:
        if not self._authorized():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": self.request_version,
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
        }
        if self.server.auth:
            env["REMOTE_USER"] = self.server.auth[0]
        for header in ("Git-Protocol", "Content-Encoding"):  # protocol v2 and gzip request bodies
            if header in self.headers:
                env["HTTP_" + header.upper().replace("-", "_")] = self.headers[header]
        length = self.headers.get("Content-Length")
        if length is not None:
            env["CONTENT_LENGTH"] = length
        proc = subprocess.Popen([HTTP_BACKEND], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        feeder = threading.Thread(target=self._feed_body, args=(proc.stdin, length), daemon=True)
        feeder.start()
        try:
            self._relay_response(proc.stdout)
        finally:
            feeder.join()
            proc.wait()

    def _feed_body(self, sink, length: str | None) -> None:
        """Stream the request body into the CGI's stdin (chunked bodies are de-chunked first)."""
        try:
            if length is not None:
                remaining = int(length)
                while remaining > 0:
                    data = self.rfile.read(min(CHUNK, remaining))
                    if not data:
                        break
                    sink.write(data)
                    remaining -= len(data)
            elif self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    sink.write(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
        except BrokenPipeError:
            pass
        finally:
            try:
                sink.close()
            except BrokenPipeError:
                pass

    def _relay_response(self, source) -> None:
        """Parse the CGI header block (`Status:` sets the code) and stream the body back."""
        status, headers = 200, []
        while (line := source.readline().rstrip(b"\r\n")):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            else:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")  # HTTP/1.0: the body ends when we close
        self.end_headers()
        while data := source.read1(CHUNK):
            self.wfile.write(data)
            self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    auth: tuple[str, str] | None


class GitHttpServer:
    """`with GitHttpServer(root) as server: server.serve(repo, "hello")` -> clone URL."""

    def __init__(self, root: str | os.PathLike, auth: tuple[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.root = self.root
        self._server.auth = auth
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "GitHttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "GitHttpServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def serve(self, repo: GitRepo, name: str) -> str:
        """Publish (or re-publish) `repo` as `<name>.git`; returns its clone URL."""
        dest = self.root / f"{name}.git"
        if dest.exists():
            shutil.rmtree(dest)
        repo.bare_clone(dest)
        return f"{self.url}/{name}.git"
