"""The build's registry relay (templates/tasks/_relay.py): what it forwards of a request, what it refuses, and that
a build step cannot use it while buildah's layer cache still works through it.

The pure checks run without infrastructure; the connection tests put the relay between a socket pair and a
real docker-registry; the last test runs the build task script with a hostile RUN step against that registry.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import urllib.parse
import uuid

import pytest

from tests.support import taskscripts
from tests.support.gitrepo import GitRepo
from tests.conftest import BuildahStorage
from tests.test_tasks import hello_repo, make_job, ok, repo_name  # noqa: F401 (fixtures)

CACHE = "cache/app"
HOST = "127.0.0.1:5000"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def relay():
    return taskscripts.load("_relay")


def head(relay, method: str, target: str, *headers: str, host: str | None = HOST):
    lines = [f"{method} {target} HTTP/1.1"] + ([f"Host: {host}"] if host else []) + list(headers)
    return relay.parse_head(("\r\n".join(lines) + "\r\n\r\n").encode(), request=True)


# --- which requests are forwarded -------------------------------------------------------------------------


@pytest.mark.parametrize("method, target", [
    ("GET", "/v2/"), ("HEAD", "/v2/"),
    ("HEAD", f"/v2/{CACHE}/blobs/{DIGEST}"), ("GET", f"/v2/{CACHE}/blobs/{DIGEST}"),
    ("POST", f"/v2/{CACHE}/blobs/uploads/"),
    ("POST", f"/v2/{CACHE}/blobs/uploads/?mount={DIGEST}&from=cache%2Fapp"),
    ("PATCH", f"/v2/{CACHE}/blobs/uploads/0f6c0c1e-2c35-4b58-9a44-8c1f5c1d2f00?_state=abc-_%3D"),
    ("PUT", f"/v2/{CACHE}/blobs/uploads/0f6c0c1e-2c35-4b58-9a44-8c1f5c1d2f00?_state=x&digest=sha256%3Aab"),
    ("DELETE", f"/v2/{CACHE}/blobs/uploads/0f6c0c1e-2c35-4b58-9a44-8c1f5c1d2f00"),
    ("HEAD", f"/v2/{CACHE}/manifests/{'c' * 64}"), ("PUT", f"/v2/{CACHE}/manifests/{'c' * 64}"),
    ("GET", f"/v2/{CACHE}/manifests/{DIGEST}"),
])
def test_the_cache_repositorys_own_traffic_is_forwarded(relay, method, target):
    assert relay.CacheRoutes(HOST, CACHE).refusal(head(relay, method, target)) is None


@pytest.mark.parametrize("method, target, reason", [
    ("GET", "/v2/_catalog", "not this build's layer cache"),
    ("GET", "/v2/temp-app/tags/list", "not this build's layer cache"),
    ("GET", "/v2/temp-app/manifests/latest", "not this build's layer cache"),
    ("HEAD", f"/v2/busybox/blobs/{DIGEST}", "another repository's blob"),
    ("DELETE", f"/v2/temp-app/manifests/{DIGEST}", "not this build's layer cache"),
    ("PUT", "/v2/temp-app/manifests/job", "not this build's layer cache"),
    ("GET", f"/v2/{CACHE}/tags/list", "not this build's layer cache"),
    ("DELETE", f"/v2/{CACHE}/manifests/{DIGEST}", "DELETE is not relayed"),
    ("DELETE", f"/v2/{CACHE}/blobs/{DIGEST}", "DELETE is not relayed"),
    ("PUT", f"/v2/{CACHE}/blobs/{DIGEST}", "PUT is not relayed"),
    ("POST", f"/v2/{CACHE}/blobs/uploads/?mount={DIGEST}&from=busybox", "a mount from a repository other than"),
    ("POST", f"/v2/{CACHE}/blobs/uploads/?from=cache/app&from=temp-app", "a mount from a repository other than"),
    ("GET", f"/v2/{CACHE}-other/manifests/x", "not this build's layer cache"),
    ("GET", f"/v2/{CACHE}/manifests/x/../../../_catalog", "not this build's layer cache"),
    ("GET", f"/v2/{CACHE}/manifests/%2e%2e", "not this build's layer cache"),
    ("GET", f"/v2//{CACHE}/manifests/x", "not this build's layer cache"),
    ("GET", f"/v2/{CACHE}/manifests/x#y", "a fragment"),
    ("GET", "http://127.0.0.1:5000/v2/_catalog", "not this build's layer cache"),
    ("CONNECT", "127.0.0.1:5000", "not this build's layer cache"),
    ("GET", "/token?scope=repository:cache/app:pull", "not this build's layer cache"),  # no token endpoint known
])
def test_everything_else_is_refused_with_a_reason(relay, method, target, reason):
    assert reason in relay.CacheRoutes(HOST, CACHE).refusal(head(relay, method, target))


@pytest.mark.parametrize("method, target, forwarded", [
    ("HEAD", f"/v2/library/busybox/blobs/{DIGEST}", True),
    ("POST", f"/v2/{CACHE}/blobs/uploads/?mount={DIGEST}&from=library%2Fbusybox", True),
    ("GET", f"/v2/library/busybox/blobs/{DIGEST}", False),
    ("GET", "/v2/library/busybox/manifests/latest", False),
    ("HEAD", f"/v2/temp-app/blobs/{DIGEST}", False),
    ("POST", f"/v2/{CACHE}/blobs/uploads/?mount={DIGEST}&from=temp-app", False),
    ("POST", f"/v2/library/busybox/blobs/uploads/?mount={DIGEST}&from={CACHE}", False),
])
def test_layers_are_mounted_from_the_builds_base_images_only(relay, method, target, forwarded):
    """buildah looks for a layer in the repositories it pulled it from, and mounts it instead of uploading it: the
    build's base images (it has read them already); never another image's."""
    routes = relay.CacheRoutes(HOST, CACHE, mount_from=frozenset({"library/busybox"}))
    assert (routes.refusal(head(relay, method, target)) is None) is forwarded


@pytest.mark.parametrize("headers, host", [((), None), (("Host: 127.0.0.1:5001",), None),
                                           (("Host: 127.0.0.1:5000",), HOST), ((), "registry.internal")])
def test_a_request_for_another_host_is_refused(relay, headers, host):
    """One Host header naming the relayed registry: a virtual host behind the same port is another registry."""
    request = head(relay, "GET", "/v2/", *headers, host=host)
    assert "Host" in relay.CacheRoutes(HOST, CACHE).refusal(request)


def test_a_protocol_upgrade_is_refused(relay):
    request = head(relay, "GET", "/v2/", "Upgrade: websocket", "Connection: Upgrade")
    assert "upgrade" in relay.CacheRoutes(HOST, CACHE).refusal(request)


@pytest.mark.parametrize("challenge, path", [
    ('Bearer realm="http://127.0.0.1:5000/auth/token",service="registry"', "/auth/token"),
    ('Basic realm="registry", Bearer realm="http://127.0.0.1:5000/token"', None),  # not the first scheme: unparsed
    ('Bearer realm="http://auth.example/token"', None),
    ('Bearer realm="https://127.0.0.1:5000/token"', None),
    ('Bearer realm="http://127.0.0.1:5000/v2/_catalog"', None),
    ('Basic realm="registry"', None),
])
def test_only_a_token_endpoint_on_the_registry_itself_is_relayed(relay, challenge, path):
    assert relay.bearer_realm_path([challenge], HOST) == path


@pytest.mark.parametrize("method, query, refused", [
    ("GET", "service=registry&scope=repository%3Acache%2Fapp%3Apull%2Cpush", False),
    ("GET", "service=registry", False),
    ("GET", "scope=repository:temp-app:pull", True),
    ("GET", "scope=repository:cache/app:pull+repository:temp-app:push", True),
    ("GET", "scope=registry:catalog:*", True),
    ("POST", "scope=repository:cache/app:pull", True),
])
def test_tokens_are_for_the_cache_repository_only(relay, method, query, refused):
    routes = relay.CacheRoutes(HOST, CACHE, token_path="/auth/token")
    assert (routes.refusal(head(relay, method, f"/auth/token?{query}")) is not None) is refused


# --- parsing: strict where readers could disagree ---------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"GET /v2/ HTTP/1.1\nHost: x\n\n",  # bare LF line ends
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET /v2/ HTTP/2\r\nHost: x\r\n\r\n",
    b"GET  /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\x00\r\n\r\n",
    b"GET /v2/\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_ambiguous_heads_are_malformed(relay, raw):
    with pytest.raises(relay.Malformed):
        relay.parse_head(raw, request=True)


@pytest.mark.parametrize("headers", [
    ("Transfer-Encoding: chunked", "Content-Length: 5"),
    ("Transfer-Encoding: gzip, chunked",),
    ("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
    ("Content-Length: 5", "Content-Length: 6"),
    ("Content-Length: +5",),
    ("Content-Length: 5, 5",),
])
def test_ambiguous_request_framing_is_malformed(relay, headers):
    with pytest.raises(relay.Malformed):
        relay.request_body(head(relay, "PUT", "/v2/", *headers))


def test_request_and_response_framing(relay):
    assert relay.request_body(head(relay, "PATCH", "/v2/", "Transfer-Encoding: Chunked")) == ("chunked", 0)
    assert relay.request_body(head(relay, "PUT", "/v2/", "Content-Length: 12", "Content-Length: 12")) == ("length", 12)
    assert relay.request_body(head(relay, "GET", "/v2/")) == ("length", 0)
    response = relay.parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", request=False)
    assert relay.response_body(response, "GET") == ("length", 7)
    assert relay.response_body(response, "HEAD") == ("length", 0)
    unframed = relay.parse_head(b"HTTP/1.1 200\r\n\r\n", request=False)
    assert relay.response_body(unframed, "GET") == ("close", 0)
    assert relay.chunk_size(b"1f;name=value\r\n") == 31
    with pytest.raises(relay.Malformed):
        relay.chunk_size(b"-1\r\n")


def test_a_socket_is_traced_through_the_namespaces_tcp_table(relay):
    table = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
             "   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1\n"
             "   1: 0100007F:1388 0100007F:A0B1 01 00000000:00000000 00:00000000 00000000     0        0 5151 1\n"
             "   2: 0100007F:A0B1 0100007F:1388 01 00000000:00000000 00:00000000 00000000     0        0 6161 1\n")
    if socket.htonl(1) == 1:  # big-endian hosts print the address the other way round
        table = table.replace("0100007F", "7F000001")
    assert relay.socket_inode(table, ("127.0.0.1", 0xA0B1), ("127.0.0.1", 5000)) == 6161
    assert relay.socket_inode(table, ("127.0.0.1", 0xA0B2), ("127.0.0.1", 5000)) is None


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("[::1]", True),
                                            ("127.0.0.2", True), ("10.1.2.3", False), ("registry.example", False)])
def test_only_loopback_registries_are_relayed(relay, host, loopback):
    assert relay.is_loopback(host) is loopback


@pytest.mark.parametrize("how", ["netlink", "tcp table"])
def test_a_connection_is_traced_to_its_client_socket_by_its_addresses(relay, how):
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) if how == "netlink" else None
    try:
        peers = relay.Peers("/proc/self/ns/net", diag)
        assert peers.inode(accepted.getpeername(), accepted.getsockname()) == os.fstat(client.fileno()).st_ino
        assert peers.inode(("127.0.0.1", 1), accepted.getsockname()) is None
        assert peers.holders(os.fstat(client.fileno()).st_ino) == [os.getpid()]
        if diag is not None:  # an answer left over from an earlier query is not taken for this one's
            diag.send(relay.diag_request(accepted.getpeername(), accepted.getsockname(), 99))
            assert peers.inode(("127.0.0.1", 1), accepted.getsockname()) is None
    finally:
        for sock in (server, client, accepted, diag):
            if sock is not None:
                sock.close()


CHURN = """import os, sys
os.dup2(int(sys.argv[1]), 100)  # the socket behind the descriptors that come and go (/proc lists fds in order)
os.close(int(sys.argv[1]))
print("ready", flush=True)
while True:
    os.close(os.open(os.devnull, os.O_RDONLY))
"""


def test_a_socket_is_traced_to_its_process_while_that_opens_and_closes_descriptors(relay):
    """buildah opens and closes descriptors all the time: one closing while the relay looks must not hide the
    socket (the build would lose its cache and fail)."""
    mine, _peer = socket.socketpair()
    inode = os.fstat(mine.fileno()).st_ino
    child = subprocess.Popen([sys.executable, "-c", CHURN, str(mine.fileno())], pass_fds=[mine.fileno()],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        mine.close()
        peers = relay.Peers("/proc/self/ns/net")
        found = [peers.holders(inode) for _ in range(100)]
    finally:
        child.kill()
        child.wait()
    assert found == [[child.pid]] * 100


def build_ctx(tls_verify: bool, network: str = "outbound"):
    common = taskscripts.load("_common")
    return common.Context(payload={"temp_image": f"{HOST}/temp-app:1", "cache_repo": f"{HOST}/{CACHE}",
                                   "tls_verify": tls_verify},
                          workdir="/tmp", storage_driver="vfs", root=None, runroot=None, isolation="chroot",
                          build_network=network)


def test_a_loopback_cache_is_relayed_with_mounts_from_its_own_base_images_only():
    build = taskscripts.load("build")
    bases = [f"{HOST}/library/busybox:1", f"{HOST}/tools@sha256:{'a' * 64}", "127.0.0.1:5001/other:1", "alpine"]
    cache, hook = build.cache_route(build_ctx(tls_verify=False), bases)
    assert cache == f"{HOST}/{CACHE}"
    assert (hook.host_port, hook.repository, hook.mount_from) == (HOST, CACHE, {"library/busybox", "tools"})
    assert build.cache_route(build_ctx(tls_verify=False, network="runner"), bases) == (cache, None)


def test_a_loopback_registry_verified_over_tls_gets_no_cache_rather_than_an_unfiltered_relay(capsys):
    build = taskscripts.load("build")
    assert build.cache_route(build_ctx(tls_verify=True), []) == (None, None)
    assert "verified over TLS, which the build's relay cannot filter" in capsys.readouterr().out


def test_a_relay_that_cannot_be_set_up_says_why_instead_of_failing(relay, tmp_path):
    hook = relay.Relay(HOST, CACHE)
    with hook(str(tmp_path / "no-such-netns")):
        pass
    assert hook.failed == "No such file or directory"


# --- connections, against a real registry -----------------------------------------------------------------


@pytest.fixture
def relayed(relay, registry):
    """(a client socket whose other end the relay serves for cache repository `cache/relay-<random>`, that
    repository, the refusals logged); the relay's thread must have ended by the test's end."""
    repository = f"cache/relay-{uuid.uuid4().hex[:8]}"
    client, served = socket.socketpair()
    refused: list[str] = []
    host, port = registry.host.rsplit(":", 1)
    thread = threading.Thread(target=relay.serve_connection, daemon=True, args=(
        served, (host, int(port)), relay.CacheRoutes(registry.host, repository), refused.append))
    thread.start()
    yield client, repository, refused
    client.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def over(client: socket.socket, registry) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(registry.host, timeout=30)
    conn.sock = client
    return conn


def exchange(conn: http.client.HTTPConnection, method: str, target: str, **kwargs) -> tuple[int, dict, bytes]:
    conn.request(method, target, **kwargs)
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def local(location: str) -> str:
    parts = urllib.parse.urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


@pytest.mark.e2e
def test_one_kept_alive_connection_uploads_a_blob_and_a_manifest_then_is_refused_the_catalog(relayed, registry):
    client, repository, refused = relayed
    spare = client.dup()  # http.client closes its socket on `Connection: close`; this one shows what the relay did
    conn = over(client, registry)
    assert exchange(conn, "GET", "/v2/")[0] == 200
    status, headers, _ = exchange(conn, "POST", f"/v2/{repository}/blobs/uploads/")
    assert status == 202
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    status, headers, _ = exchange(conn, "PATCH", local(headers["Location"]), encode_chunked=True,
                                  body=iter([config[:10], config[10:]]),
                                  headers={"Content-Type": "application/octet-stream"})
    assert status == 202  # a chunked body, relayed chunk by chunk
    upload = local(headers["Location"])
    status, _, _ = exchange(conn, "PUT", f"{upload}&digest={urllib.parse.quote(digest)}", body=b"")
    assert status == 201
    status, headers, _ = exchange(conn, "HEAD", f"/v2/{repository}/blobs/{digest}")
    assert (status, headers.get("Content-Length")) == (200, str(len(config)))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest,
                                      "size": len(config)}, "layers": []})
    status, _, _ = exchange(conn, "PUT", f"/v2/{repository}/manifests/kept",
                            body=manifest, headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 201
    status, headers, body = exchange(conn, "GET", "/v2/_catalog")
    assert (status, headers["Connection"]) == (403, "close")
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
    assert spare.recv(1) == b""  # the relay ended the connection after its answer
    spare.close()
    assert registry.tags(repository) == ["kept"]  # everything before the refusal really reached the registry
    assert refused == [f"GET /v2/_catalog: not this build's layer cache ({repository})"]


@pytest.mark.e2e
def test_expect_continue_is_answered_by_the_relay(relayed, registry):
    client, repository, refused = relayed
    client.sendall(f"POST /v2/{repository}/blobs/uploads/ HTTP/1.1\r\nHost: {registry.host}\r\n"
                   "Expect: 100-continue\r\nContent-Length: 0\r\n\r\n".encode())
    reader = client.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.1 202")  # no body: nothing to continue
    client.sendall(f"PUT /v2/{repository}/manifests/x HTTP/1.1\r\nHost: {registry.host}\r\n"
                   "Expect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n".encode())
    while reader.readline() not in (b"\r\n", b""):  # the rest of the 202
        pass
    assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert reader.readline() == b"\r\n"
    client.sendall(b"{}")
    assert reader.readline().startswith(b"HTTP/1.1 400")  # the registry's own verdict on `{}`
    assert refused == []


@pytest.mark.e2e
@pytest.mark.parametrize("raw, answer", [
    (b"PUT /v2/_catalog HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     b"HTTP/1.1 400 Bad Request"),
    (b"GET /v2/ HTTP/1.1\r\nHost: {host}\r\nX: " + b"y" * 40000 + b"\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    (b"get /v2/ HTTP/1.1\r\n", b"HTTP/1.1 400 Bad Request"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b""),  # a TLS ClientHello: closed, unanswered, unlogged
])
def test_malformed_requests_are_answered_by_the_relay_and_never_forwarded(relayed, registry, raw, answer):
    client, _, refused = relayed
    before = registry.catalog()
    client.sendall(raw.replace(b"{host}", registry.host.encode()))
    assert client.makefile("rb").readline().rstrip(b"\r\n") == answer
    assert len(refused) == (1 if answer else 0)
    assert registry.catalog() == before


# --- a hostile build step, through the build task script -------------------------------------------------

REQUEST = r"""req() {  # name method path [body]: prints the status line the relay or registry answered
  start='%s %s HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nContent-Length: %s\r\nConnection: close\r\n'
  rest='Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\r\n%s'
  printf "$start$rest" "$2" "$3" "${#4}" "$4" | nc 127.0.0.1 PORT | head -n 1 | tr -d '\r' | sed "s|^|probe $1: |"
}
"""

NONCE = "relaytest"  # the cache report is a control line only with the phase's nonce
FROM_A_STEP = "it comes from a build step (a chrooted process), not from buildah"


def contents(registry) -> dict[tuple[str, str], str | None]:
    """Every repository:tag of the registry and its manifest digest."""
    return {(repo, tag): registry.manifest_digest(repo, tag)
            for repo in registry.catalog() for tag in registry.tags(repo)}


@pytest.mark.e2e
def test_a_build_step_cannot_use_the_relay_and_the_cache_still_works(make_job, hello_repo, tmp_path, registry):
    other = make_job(f"file://{hello_repo.path}")  # another job's temp image, in the registry the cache is in
    ok(other.run("build"))
    other_repo, other_tag = repo_name(other.temp_image)
    other_digest = registry.manifest_digest(other_repo, other_tag)
    cache = f"cache/hostile-{uuid.uuid4().hex[:8]}"
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:" + "0" * 64, "size": 1}, "layers": []})
    probes = [("ping", "GET", "/v2/", ""), ("catalog", "GET", "/v2/_catalog", ""),
              ("tags", "GET", f"/v2/{other_repo}/tags/list", ""),
              ("manifest", "GET", f"/v2/{other_repo}/manifests/{other_tag}", ""),
              ("delete", "DELETE", f"/v2/{other_repo}/manifests/{other_digest}", ""),
              ("put", "PUT", f"/v2/{other_repo}/manifests/hijacked", manifest),
              ("poison", "PUT", f"/v2/{cache}/manifests/poisoned", manifest)]
    port = registry.host.rsplit(":", 1)[1]
    script = "#!/bin/sh\n" + REQUEST.replace("PORT", port) + "".join(
        f"req {name} {method} {path} {shlex.quote(body)}\n" for name, method, path, body in probes)
    repo = GitRepo.create(tmp_path / "hostile", {"probe.sh": script + 'echo "probes-$((40+2))"\n', "Dockerfile": (
        f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nCOPY probe.sh /\nRUN sh /probe.sh\n"
        f"RUN echo {uuid.uuid4().hex} > /two\n")})
    url = f"file://{repo.path}"
    before = contents(registry)

    hostile = make_job(url, cache_repo=f"{registry.host}/{cache}")
    built = ok(hostile.run("build", JOBFORGE_CONTROL_NONCE=NONCE))
    lines = built.stdout.splitlines()
    assert "probes-42" in lines, built.stdout
    for name, *_ in probes:
        assert f"probe {name}: HTTP/1.1 403 Forbidden" in lines, built.stdout  # the relay's answer, not the registry's
    refusals = [line for line in lines if line.startswith("==> registry relay refused ")]
    from_step = [line for line in refusals if line.endswith(FROM_A_STEP)]
    assert len(from_step) == len(probes)
    assert all("another repository's blob" in line for line in set(refusals) - set(from_step))  # buildah's own
    base_repo = repo_name(hostile.payload["build_args"]["BASE_IMAGE"])[0]
    assert not [line for line in refusals if f"/v2/{base_repo}/" in line]  # the base image's layers are mountable
    after = contents(registry)
    assert before.items() <= after.items()  # nothing deleted or replaced
    assert {key for key in after.keys() - before.keys() if key[0] != cache} == {(other_repo, hostile.id)}
    assert registry.tags(cache) and all(re.fullmatch("[0-9a-f]{64}", tag) for tag in registry.tags(cache))
    assert f'::jobforge-{NONCE} cache {{"hits": 0, "misses": 3}}' in built.stderr

    # A node with an empty store rebuilds it from the cache repository, through the same relay.
    cold = make_job(url, cache_repo=f"{registry.host}/{cache}")
    cold.storage = BuildahStorage(root=tmp_path / "cold" / "root", runroot=tmp_path / "cold" / "runroot")
    rebuilt = ok(cold.run("build", JOBFORGE_CONTROL_NONCE=NONCE))
    assert rebuilt.stdout.count(f"Cache pulled from remote {registry.host}/{cache}:") == 3
    assert f'::jobforge-{NONCE} cache {{"hits": 3, "misses": 0}}' in rebuilt.stderr
    assert all("another repository's blob" in line for line in rebuilt.stdout.splitlines()
               if line.startswith("==> registry relay refused "))
