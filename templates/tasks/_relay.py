"""The build's registry relay (stdlib only): a registry on this machine's loopback, reached from the build's
network namespace for buildah's layer-cache traffic and nothing else.

`buildah bud --cache-from/--cache-to <registry>/<cache prefix>/<image>` runs in the sandbox's network namespace,
where the host's loopback is out of reach, and the Dockerfile's RUN steps share that namespace. A byte pipe to
the registry's port hands them the whole registry (on one without authentication: the catalog, every
repository, pushes and deletes). So, per connection:

* only buildah's own: every process holding the connecting socket must share the relay's root directory. RUN
  steps run chrooted in the image's root filesystem, so none of their connections qualify; the filter alone
  would still let them write this build's cache repository (that is the traffic `--cache-to` needs);
* only what the cache needs: each request is read (HTTP/1.1, keep-alive, Content-Length or chunked bodies,
  bounded heads, parsed strictly) and forwarded only if it is the registry ping (`/v2/`), the distribution API
  on this build's cache repository (blobs, uploads, manifests; deletes only of uploads) or the registry's own
  token endpoint for that repository. Anything else gets a 403 from the relay, is logged, and never reaches the
  registry. Plain HTTP only: bytes the relay cannot read (TLS) are never relayed.

docs/security.md says what remains.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import select
import socket
import struct
import threading
import urllib.parse
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Iterator

MAX_CONNECTIONS = 64  # buildah's, at once
MAX_DENIED_CONNECTIONS = 8  # a build step's, at once: each is answered and closed
DENIED_TIMEOUT = 10.0  # for a build step's connection to send its first request
MAX_HEAD_BYTES = 32 * 1024  # a request's or response's start line and headers
MAX_HEADERS = 100
MAX_LINE_BYTES = 4096  # a chunk-size line or a trailer line
MAX_LOGGED_REFUSALS = 20  # then only the total: a RUN step must not flood its job's log through us
LINGER_SECONDS = 2.0  # after a refusal: time for the client to read it before the socket closes
LINGER_BYTES = 1 << 20
CONNECT_TIMEOUT = 30.0
REFUSED = "==> registry relay refused "  # a refused request's log line (the job's build log)
_CLONE_NEWNET = 0x40000000
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # what no header value holds (HTAB is allowed)
_DIGEST = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_UPLOAD_ID = r"[A-Za-z0-9_=-][A-Za-z0-9_.=-]{0,255}"
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")
_REALM = re.compile(r'^\s*bearer\s.*?\brealm="([^"]*)"', re.IGNORECASE)
_OTHER_BLOB = re.compile(f"/v2/(.+)/blobs/{_DIGEST}")
_SCOPE = re.compile(r"repository:([^:]+):((?:pull|push)(?:,(?:pull|push))*)")
_PHRASES = {400: "Bad Request", 403: "Forbidden"}


class Malformed(ValueError):
    """A message the relay will not interpret: the connection ends (a request gets a 400 first)."""


class NotHttp(Malformed):
    """A TLS handshake: buildah tries https first when TLS verification is off, then falls back to http when the
    connection just ends. Not a refusal worth logging."""


# --- messages (pure) --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """A request's or response's start line (three parts) and headers, as received."""

    start: tuple[str, str, str]
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]

    def tokens(self, name: str) -> set[str]:
        """The comma-separated tokens of every `name` header, lower case (`Connection: keep-alive, Close`)."""
        return {t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()}

    def without(self, name: str) -> Head:
        return Head(self.start, tuple((k, v) for k, v in self.headers if k.lower() != name))

    def encode(self) -> bytes:
        """The head as sent on: exactly what was parsed, so the registry reads what the relay checked."""
        lines = [" ".join(self.start)] + [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_head(data: bytes, request: bool) -> Head:
    """`data`: a head up to and including its blank line. Strict where readers disagree (request smuggling):
    CRLF line ends only, no folded or nameless headers, no control characters, HTTP/1.0 or 1.1."""
    if not data.endswith(b"\r\n\r\n"):
        raise Malformed("the head does not end with an empty line")
    lines = data[:-4].decode("latin-1").split("\r\n")
    if any("\r" in line or "\n" in line for line in lines):
        raise Malformed("a bare CR or LF in the head")
    if len(lines) - 1 > MAX_HEADERS:
        raise Malformed(f"more than {MAX_HEADERS} headers")
    if request:
        parts = lines[0].split(" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] or _CTL.search(parts[1]) \
                or parts[1] != parts[1].strip() or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise Malformed("not an HTTP/1.x request line")
    else:
        version, _, rest = lines[0].partition(" ")
        status, _, phrase = rest.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or not re.fullmatch(r"[1-5][0-9][0-9]", status):
            raise Malformed("not an HTTP/1.x status line")
        parts = [version, status, phrase]
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or _CTL.search(value):
            raise Malformed("a malformed header line")
        headers.append((name, value.strip(" \t")))
    return Head((parts[0], parts[1], parts[2]), tuple(headers))


def content_length(head: Head) -> int | None:
    values = head.values("content-length")
    if not values:
        return None
    if len(set(values)) != 1 or not re.fullmatch(r"[0-9]{1,18}", values[0]):
        raise Malformed("an invalid or repeated Content-Length")
    return int(values[0])


def request_body(head: Head) -> tuple[str, int]:
    """("length", n) or ("chunked", 0): a request with both framings, or another coding, is refused as Go's
    server would refuse it, so the relay and the registry never disagree on where a request ends."""
    codings = head.values("transfer-encoding")
    if codings:
        if len(codings) != 1 or codings[0].lower() != "chunked" or head.values("content-length"):
            raise Malformed("Transfer-Encoding other than a single 'chunked', or with Content-Length")
        return "chunked", 0
    return "length", content_length(head) or 0


def response_body(head: Head, method: str) -> tuple[str, int]:
    """("length", n), ("chunked", 0) or ("close", 0): the response's body framing (RFC 9112 6.3)."""
    status = int(head.start[1])
    if method == "HEAD" or status < 200 or status in (204, 304):
        return "length", 0
    codings = head.tokens("transfer-encoding")
    if codings:
        last = head.values("transfer-encoding")[-1].split(",")[-1].strip().lower()
        return ("chunked", 0) if last == "chunked" else ("close", 0)
    length = content_length(head)
    return ("close", 0) if length is None else ("length", length)


def keeps_alive(request: Head, response: Head, body: tuple[str, int]) -> bool:
    return (body[0] != "close" and request.start[2] == response.start[0] == "HTTP/1.1"
            and "close" not in request.tokens("connection") and "close" not in response.tokens("connection"))


def chunk_size(line: bytes) -> int:
    """A chunk-size line (`1a2b;ext=x\\r\\n`) -> its size."""
    size = line[:-2].split(b";", 1)[0].rstrip(b" \t")
    if not _CHUNK_SIZE.fullmatch(size) or _CTL.search(line[:-2].decode("latin-1")):
        raise Malformed("an invalid chunk-size line")
    return int(size, 16)


def bearer_realm_path(challenges: list[str], host_port: str) -> str | None:
    """The path of a `WWW-Authenticate: Bearer realm=...` token endpoint served by the registry itself (same host
    and port, plain http): buildah fetches its token there through the relay. A realm elsewhere is not relayed,
    nor one under /v2/ (it must not widen what is reachable of the registry's API)."""
    for challenge in challenges:
        match = _REALM.match(challenge)
        if not match:
            continue
        realm = urllib.parse.urlsplit(match.group(1))
        if realm.scheme == "http" and realm.netloc.lower() == host_port.lower() and realm.path.startswith("/") \
                and not realm.path.startswith("/v2/") and not _CTL.search(realm.path):
            return realm.path
    return None


@dataclass(frozen=True)
class CacheRoutes:
    """What one build's layer cache needs of the registry `host_port` (as buildah names it, the Host header it
    sends): the ping, its cache `repository`'s blobs, uploads and manifests, and the token endpoint at
    `token_path` for that repository only. `mount_from`: the repositories of this build's base images on that
    registry, which the build has already read; buildah asks whether a layer is there (`HEAD` of the blob) and
    mounts it into the cache repository instead of compressing and uploading it again."""

    host_port: str
    repository: str
    token_path: str | None = None
    mount_from: frozenset[str] = frozenset()

    @cached_property
    def _routes(self) -> tuple[tuple[str, re.Pattern, frozenset[str]], ...]:
        base = "/v2/" + re.escape(self.repository)
        return (
            ("ping", re.compile(r"/v2/"), frozenset({"GET", "HEAD"})),
            ("blob", re.compile(f"{base}/blobs/{_DIGEST}"), frozenset({"GET", "HEAD"})),
            ("upload-start", re.compile(f"{base}/blobs/uploads/"), frozenset({"POST"})),
            # DELETE cancels an upload (containers/image does when a mount starts an upload instead); never a
            # blob or a manifest.
            ("upload", re.compile(f"{base}/blobs/uploads/{_UPLOAD_ID}"), frozenset({"GET", "PATCH", "PUT", "DELETE"})),
            ("manifest", re.compile(f"{base}/manifests/(?:{_TAG}|{_DIGEST})"), frozenset({"GET", "HEAD", "PUT"})),
        )

    def refusal(self, head: Head) -> str | None:
        """Why `head` is not forwarded, or None when it is what the cache needs."""
        method, target, _ = head.start
        hosts = head.values("host")
        if len(hosts) != 1 or hosts[0].lower() != self.host_port.lower():
            return f"its Host is not {self.host_port}"
        if head.values("upgrade"):
            return "protocol upgrades are not relayed"
        path, _, query = target.partition("?")
        if "#" in target:
            return "a fragment in the target"
        if self.token_path is not None and path == self.token_path:
            return self._token_refusal(method, query)
        route = next((r for r in self._routes if r[1].fullmatch(path)), None)
        if route is None and (other := _OTHER_BLOB.fullmatch(path)):
            if method == "HEAD" and other.group(1) in self.mount_from:
                return None
            # buildah asks this of the repositories it knows a layer from, to mount it; refused, it uploads the layer.
            return f"another repository's blob, not this build's layer cache ({self.repository})"
        if route is None:
            return f"not this build's layer cache ({self.repository})"
        if method not in route[2]:
            return f"{method} is not relayed for the {route[0]} route"
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        if route[0] == "upload-start" and any(v != self.repository and v not in self.mount_from
                                              for v in params.get("from", ())):
            return "a mount from a repository other than this build's cache and base images"
        return None

    def _token_refusal(self, method: str, query: str) -> str | None:
        if method != "GET":
            return f"{method} on the token endpoint"
        for scope in urllib.parse.parse_qs(query, keep_blank_values=True).get("scope", ()):
            for one in scope.split(" "):
                match = _SCOPE.fullmatch(one)
                if not match or match.group(1) != self.repository:
                    return f"a token scope other than {self.repository}"
        return None


def loggable(head: Head) -> str:
    """A request's method and target for the log: printable ASCII, bounded (the request is the RUN step's)."""
    text = f"{head.start[0]} {head.start[1]}"
    text = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= 200 else text[:200] + "..."


def error_answer(status: int, reason: str) -> bytes:
    """The relay's own answer, in the registry's error format so buildah and clients print the reason."""
    code = "DENIED" if status == 403 else "UNSUPPORTED"
    body = json.dumps({"errors": [{"code": code, "message": f"refused by the build's registry relay: {reason}"}]})
    return (f"HTTP/1.1 {status} {_PHRASES[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}").encode()


# --- connections ------------------------------------------------------------------------------------------


class Stream:
    """Bounded, buffered reads from one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def head(self, request: bool) -> bytes | None:
        """The next head, None when the peer closed before sending a byte of one."""
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if request and self.buf[:1] == b"\x16":
                raise NotHttp("a TLS handshake")  # at once: a TLS client waits for our answer
            if request and self.buf and not self.buf[:1].isupper():
                raise Malformed("not an HTTP request")
            if len(self.buf) > MAX_HEAD_BYTES:
                raise Malformed(f"a head larger than {MAX_HEAD_BYTES} bytes")
            if not self._fill():
                if self.buf:
                    raise Malformed("the connection closed inside a head")
                return None
        if end + 4 > MAX_HEAD_BYTES:
            raise Malformed(f"a head larger than {MAX_HEAD_BYTES} bytes")
        head, self.buf = self.buf[:end + 4], self.buf[end + 4:]
        return head

    def line(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            if len(self.buf) > MAX_LINE_BYTES or not self._fill():
                raise Malformed("a missing or overlong line in a chunked body")
        if end == 0 or self.buf[end - 1:end] != b"\r" or end >= MAX_LINE_BYTES:
            raise Malformed("a chunked body line without CRLF")
        line, self.buf = self.buf[:end + 1], self.buf[end + 1:]
        return line

    def copy(self, count: int, dst: socket.socket) -> None:
        while count > 0:
            if not self.buf and not self._fill():
                raise Malformed("the connection closed inside a body")
            piece, self.buf = self.buf[:count], self.buf[count:]
            dst.sendall(piece)
            count -= len(piece)

    def copy_to_close(self, dst: socket.socket) -> None:
        while self.buf or self._fill():
            dst.sendall(self.buf)
            self.buf = b""

    def body(self, framing: tuple[str, int], dst: socket.socket) -> None:
        kind, length = framing
        if kind == "length":
            self.copy(length, dst)
        elif kind == "close":
            self.copy_to_close(dst)
        else:
            self.chunked(dst)

    def chunked(self, dst: socket.socket) -> None:
        while size := chunk_size(line := self.line()):
            dst.sendall(line)
            self.copy(size, dst)
            if self.line() != b"\r\n":
                raise Malformed("a chunk longer than its size")
            dst.sendall(b"\r\n")
        dst.sendall(line)
        for _ in range(MAX_HEADERS + 1):  # trailers, then the empty line
            trailer = self.line()
            if trailer != b"\r\n":
                parse_head(b"HTTP/1.1 200 OK\r\n" + trailer + b"\r\n", request=False)  # a header line, or Malformed
            dst.sendall(trailer)
            if trailer == b"\r\n":
                return
        raise Malformed("too many trailers")


def _answer_and_close(client: socket.socket, status: int, reason: str) -> None:
    """Send the relay's own answer, then drain what the client still sends for a moment before closing: closing
    with unread data would reset the connection and could destroy the answer before the client reads it."""
    with contextlib.suppress(OSError):
        client.sendall(error_answer(status, reason))
        client.shutdown(socket.SHUT_WR)
        client.settimeout(LINGER_SECONDS)
        drained = 0
        while drained < LINGER_BYTES and (data := client.recv(65536)):
            drained += len(data)


def _idle_closed(sock: socket.socket) -> bool:
    """Whether a kept-alive upstream connection was closed (or sent something unasked) while idle."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def serve_connection(client: socket.socket, target: tuple[str, int], routes: CacheRoutes,
                     refused: Callable[[str], None], denied: str | None = None) -> None:
    """Relay one client connection request by request (one at a time, like the Go client buildah is): check each
    request, forward it and its body, then the registry's response and its body. A refused or malformed request
    ends the connection with the relay's own answer; the registry never sees it. The registry connection is
    opened at the first forwarded request. `denied`: why nothing of this connection is relayed (its first
    request is still read, to be logged and answered)."""
    requests = Stream(client)
    upstream: Stream | None = None
    try:
        while True:
            try:
                raw = requests.head(request=True)
                if raw is None:
                    return
                head = parse_head(raw, request=True)
                framing = request_body(head)
            except NotHttp:
                return
            except Malformed as exc:
                refused(f"a malformed request ({exc})")
                _answer_and_close(client, 400, str(exc))
                return
            reason = denied or routes.refusal(head)
            if reason is not None:
                refused(f"{loggable(head)}: {reason}")
                _answer_and_close(client, 403, reason)
                return
            if upstream is not None and not upstream.buf and _idle_closed(upstream.sock):
                upstream.sock.close()
                upstream = None
            if upstream is None:
                sock = socket.create_connection(target, timeout=CONNECT_TIMEOUT)
                sock.settimeout(None)
                upstream = Stream(sock)
            if not _exchange(requests, upstream, head, framing):
                return
    except (OSError, Malformed):
        return  # a broken exchange: both connections end (the registry saw at most a truncated request)
    finally:
        client.close()
        if upstream is not None:
            upstream.sock.close()


def _exchange(requests: Stream, upstream: Stream, head: Head, framing: tuple[str, int]) -> bool:
    """Forward one checked request and the registry's response; whether the connection stays open."""
    if "100-continue" in head.tokens("expect"):
        head = head.without("expect")  # the relay answers it: forwarded, the registry's 100 would race the body
        if framing != ("length", 0):
            requests.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    upstream.sock.sendall(head.encode())
    requests.body(framing, upstream.sock)
    while True:
        raw = upstream.head(request=False)
        if raw is None:
            return False
        response = parse_head(raw, request=False)
        requests.sock.sendall(raw)
        if response.start[1] == "101":
            return False  # never asked for (upgrades are refused); nothing more is relayed
        if not response.start[1].startswith("1"):
            break
    body = response_body(response, head.start[0])
    upstream.body(body, requests.sock)
    return keeps_alive(head, response, body)


# --- who is connecting --------------------------------------------------------------------------------------


def _address(hex_address: str) -> tuple[str, int]:
    """`0100007F:1F90` (a /proc/net/tcp address: IPv4 in host byte order, port in hex) -> ("127.0.0.1", 8080)."""
    ip, _, port = hex_address.partition(":")
    return socket.inet_ntoa(struct.pack("=I", int(ip, 16))), int(port, 16)


def socket_inode(tcp_table: str, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the socket whose local and remote addresses are these, from a /proc/<pid>/net/tcp text."""
    for line in tcp_table.splitlines()[1:]:
        fields = line.split()
        with contextlib.suppress(IndexError, ValueError):
            if _address(fields[1]) == local and _address(fields[2]) == remote and int(fields[9]):
                return int(fields[9])
    return None


_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST = 4, 20, 1
_NO_COOKIE = 0xFFFFFFFF


def diag_request(local: tuple[str, int], remote: tuple[str, int], seq: int) -> bytes:
    """A sock_diag netlink request (number `seq`) for the one IPv4 TCP socket whose own address is `local` and
    whose peer is `remote`: the kernel finds it by its addresses (no dump of the namespace's sockets)."""
    sockid = (struct.pack("!HH", local[1], remote[1]) + socket.inet_aton(local[0]) + bytes(12)
              + socket.inet_aton(remote[0]) + bytes(12) + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE))
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    return struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, seq, 0) + request


def diag_seq(reply: bytes) -> int | None:
    """The number of the request a netlink reply answers (its error replies carry it too)."""
    return struct.unpack_from("=I", reply, 8)[0] if len(reply) >= 16 else None


def diag_inode(reply: bytes, request: bytes) -> int | None:
    """The socket's inode from the answer to `request` (inet_diag_msg.idiag_inode), None for an error (no such
    socket) or an answer about another socket (its addresses and ports must be the ones asked for)."""
    if len(reply) < 88 or struct.unpack_from("=H", reply, 4)[0] != _SOCK_DIAG_BY_FAMILY:
        return None
    if reply[20:56] != request[24:60]:  # inet_diag_msg.id vs the request's: ports, then addresses
        return None
    return struct.unpack_from("=I", reply, 84)[0] or None


def _same_netns(pid: int | str, want: os.stat_result) -> bool:
    ns = os.stat(f"/proc/{pid}/ns/net")
    return (ns.st_dev, ns.st_ino) == (want.st_dev, want.st_ino)


def holding(pids: list[int], inode: int) -> list[int]:
    """Those of `pids` holding socket `inode`. A process or descriptor that goes away while it is looked at is
    skipped alone (buildah opens and closes descriptors all the time)."""
    link = f"socket:[{inode}]"
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    found.append(pid)
                    break
    return found


class Peers:
    """Traces connections to the processes holding their client socket in the network namespace `netns`
    (`/proc/<pid>/ns/net`): the socket's inode from `diag` (a sock_diag netlink socket opened in that namespace;
    the namespace's TCP table when there is none, which costs milliseconds: the kernel walks its whole hash), then
    its holders from the descriptors of the namespace's processes. Those are listed once and again only when a
    socket is not found among them (a new process: a build step, or one of buildah's), so buildah's connections
    cost a look at a few processes' descriptors, not at every process of the host."""

    def __init__(self, netns: str, diag: socket.socket | None = None) -> None:
        self.netns = netns
        self.diag = diag
        self.known: list[int] = []
        self.seq = 0

    def inode(self, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
        if self.diag is not None:
            self.seq += 1
            request = diag_request(local, remote, self.seq)
            with contextlib.suppress(OSError):
                self.diag.send(request)
                for _ in range(4):  # an answer left over from an interrupted query is skipped
                    reply = self.diag.recv(65536)
                    if diag_seq(reply) == self.seq:
                        return diag_inode(reply, request)
                return None
        with open(os.path.join(self.netns.rsplit("/ns/", 1)[0], "net", "tcp"), encoding="ascii") as fh:
            return socket_inode(fh.read(), local, remote)

    def members(self) -> list[int]:
        want = os.stat(self.netns)
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if _same_netns(pid, want):
                    pids.append(int(pid))
        return pids

    def holders(self, inode: int) -> list[int]:
        """The namespace's processes holding socket `inode` (a process a known pid was reused by is not one)."""
        want = os.stat(self.netns)
        found = holding(self.known, inode)
        if not found:
            self.known = self.members()
            found = holding(self.known, inode)
        return [pid for pid in found if _same_netns(pid, want)]

    def denial(self, client: socket.socket) -> str | None:
        """Why the client of `client` is not buildah itself, or None: every process holding the connecting socket
        must have the relay's root directory. Fails closed: a socket that cannot be traced is denied."""
        try:
            inode = self.inode(client.getpeername()[:2], client.getsockname()[:2])
            pids = self.holders(inode) if inode else []
            ours = os.stat("/")
            roots = [os.stat(f"/proc/{pid}/root") for pid in pids]
        except OSError as exc:
            return f"its process could not be checked ({exc.strerror or exc})"
        if not pids:
            return "its process could not be found"
        if any((r.st_dev, r.st_ino) != (ours.st_dev, ours.st_ino) for r in roots):
            return "it comes from a build step (a chrooted process), not from buildah"
        return None


# --- the relay --------------------------------------------------------------------------------------------


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


def probe(target: tuple[str, int], host_port: str) -> tuple[str | None, str | None]:
    """(why the registry cannot be relayed or None, its token endpoint's path or None), from one plain-HTTP
    `GET /v2/`: a registry that does not answer it with 200 or 401 (a TLS one) gets no relay."""
    try:
        with socket.create_connection(target, timeout=10) as sock:
            sock.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n".encode())
            raw = Stream(sock).head(request=False)
            response = parse_head(raw, request=False) if raw else None
    except OSError as exc:
        return f"{host_port}: {exc.strerror or exc}", None
    except Malformed:
        response = None
    if response is None or response.start[1] not in ("200", "401"):
        answer = " ".join(response.start) if response else "no HTTP answer"
        return f"{host_port} does not answer plain HTTP on /v2/ ({answer}); the relay forwards plain HTTP only", None
    return None, bearer_realm_path(response.values("www-authenticate"), host_port)


def _listen_in(netns: str, port: int) -> tuple[socket.socket, socket.socket | None]:
    """A socket listening on 127.0.0.1:`port` inside the network namespace at `netns`, and a sock_diag netlink
    socket there, None when the kernel refuses one (setns is per thread: a short-lived thread enters the
    namespace, opens the sockets there and ends)."""
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
            with contextlib.suppress(OSError):
                result["diag"] = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                               _NETLINK_SOCK_DIAG)
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=enter, name="relay-setns", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["sock"], result.get("diag")  # type: ignore[return-value]


class Relay:
    """The sandbox's `inside` hook for a cache repository (`host:port/repository`) whose registry is on this
    machine's loopback: while the build runs, 127.0.0.1:<port> in the build's namespace is that registry's port
    behind the filter. `failed` says why it could not be set up (the build then goes without the registry
    cache); `refused` counts the requests it answered itself."""

    def __init__(self, host_port: str, repository: str, mount_from: Iterable[str] = (),
                 log: Callable[[str], None] | None = None) -> None:
        self.host_port = host_port
        self.repository = repository
        self.mount_from = frozenset(mount_from)
        self.failed: str | None = None
        self.refused = 0
        self._log = log or (lambda line: print(line, flush=True))
        self._lock = threading.Lock()

    def _refuse(self, what: str) -> None:
        with self._lock:
            self.refused += 1
            count = self.refused
        if count <= MAX_LOGGED_REFUSALS:
            self._log(REFUSED + what)

    @contextlib.contextmanager
    def __call__(self, netns: str) -> Iterator[None]:
        host, port = split_host_port(self.host_port)
        target = ("127.0.0.1" if host == "localhost" else host, port)
        try:
            listener, diag = _listen_in(netns, port)
        except OSError as exc:
            self.failed = exc.strerror or str(exc)
            yield
            return
        self.failed, token_path = probe(target, self.host_port)
        if self.failed:
            for sock in (listener, diag):
                if sock is not None:
                    sock.close()
            yield
            return
        routes = CacheRoutes(self.host_port, self.repository, token_path, self.mount_from)
        threading.Thread(target=self._serve, args=(listener, Peers(netns, diag), target, routes),
                         name="registry-relay", daemon=True).start()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            for sock in (listener, diag):
                if sock is not None:
                    sock.close()
            if self.refused:
                self._log(f"==> registry relay: {self.refused} request(s) refused in all (only this build's "
                          f"layer cache {self.host_port}/{self.repository} is relayed)")

    def _serve(self, listener: socket.socket, peers: Peers, target: tuple[str, int], routes: CacheRoutes) -> None:
        """Accept and check each connection here, in turn, so a build step's connections never take the slots of
        buildah's: theirs are few, short-lived and answered without the registry."""
        slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        denied_slots = threading.BoundedSemaphore(MAX_DENIED_CONNECTIONS)
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the build is over
            denial = peers.denial(conn)
            taken = denied_slots if denial else slots
            if not taken.acquire(blocking=False):
                conn.close()
                if denial:
                    self._refuse(f"a connection: {denial} (and {MAX_DENIED_CONNECTIONS} such are open)")
                continue
            if denial:
                conn.settimeout(DENIED_TIMEOUT)

            def one(conn: socket.socket = conn, denial: str | None = denial,
                    taken: threading.BoundedSemaphore = taken) -> None:
                try:
                    serve_connection(conn, target, routes, self._refuse, denial)
                finally:
                    taken.release()

            threading.Thread(target=one, name="registry-relay-conn", daemon=True).start()
