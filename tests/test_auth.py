"""The pure parts of API access control: the tokens file format, token matching, the owner decision, and the
guard's Host / CORS / Content-Type / exposure decisions (jobforge.auth, jobforge.server.guard)."""

from __future__ import annotations

import pytest

from jobforge import auth
from jobforge.errors import Forbidden, Unauthorized
from jobforge.server import guard

TOKENS = """\
# a comment line
   # an indented comment
ops-token-0123456789                  # every owner
ann-token-0123456789 ann
pair-token-012345678 ann,bob # two owners
short ann
x-token-0123456789ab ann, bob
y-token-0123456789ab ann,,bob
tok#en-with-hash-0001 carol
"""


def test_token_file_lines_grant_what_they_say_and_bad_lines_grant_nothing():
    entries, problems = auth.parse_tokens(TOKENS)
    assert [e.principal.owners for e in entries] == [None, frozenset({"ann"}), frozenset({"ann", "bob"}),
                                                     frozenset({"carol"})]
    assert [(p.line, p.rule) for p in problems] == [
        (6, "token shorter than 16 characters"),
        (7, "expected '<token>' or '<token> <owner>[,<owner>...]'"),
        (8, "empty owner name in the owner list"),
    ]
    assert "0123456789" not in repr(entries)  # only digests are kept


@pytest.mark.parametrize("header, owners", [
    ("Bearer ops-token-0123456789", None),
    ("bearer ann-token-0123456789", frozenset({"ann"})),
    ("Bearer   pair-token-012345678  ", frozenset({"ann", "bob"})),
    ("Bearer tok#en-with-hash-0001", frozenset({"carol"})),
])
def test_authenticate_finds_the_tokens_principal(header, owners):
    entries, _ = auth.parse_tokens(TOKENS)
    assert auth.authenticate(entries, header).owners == owners


@pytest.mark.parametrize("header, message", [
    (None, "missing bearer token"), ("", "missing bearer token"), ("Bearer", "missing bearer token"),
    ("Basic b3BzOnB3", "missing bearer token"), ("ops-token-0123456789", "missing bearer token"),
    ("Bearer ops-token-012345678", "invalid bearer token"), ("Bearer ops-token-0123456789x", "invalid bearer token"),
    ("Bearer short", "invalid bearer token"), ("Bearer tok", "invalid bearer token"),
])
def test_authenticate_refuses_missing_and_unknown_tokens(header, message):
    entries, _ = auth.parse_tokens(TOKENS)
    with pytest.raises(Unauthorized, match=message):
        auth.authenticate(entries, header)


def test_no_tokens_refuses_everyone():
    with pytest.raises(Unauthorized):
        auth.authenticate([], "Bearer ops-token-0123456789")


def test_authorize_is_a_decision_over_principal_and_owner():
    ann = auth.Principal(frozenset({"ann"}), "t")
    auth.authorize(ann, "ann")
    auth.authorize(auth.EVERYONE, "anyone")
    with pytest.raises(Forbidden) as info:
        auth.authorize(ann, "bob", job_id="j-1")
    assert info.value.data == {"owner": "bob", "job_id": "j-1"} and info.value.http_status == 403


# ---------------------------------------------------------------- the guard's decisions

@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)), ("LocalHost.:8080", ("localhost", 8080)), ("[::1]:8080", ("::1", 8080)),
    ("example.com", ("example.com", None)), ("[::1]", ("::1", None)),
])
def test_split_host(host, expected):
    assert guard.split_host(host) == expected


@pytest.mark.parametrize("host", ["", ":80", "a:b", "::1", "[::1", "[::1]x", "host:80:90", "[::1]:x"])
def test_split_host_rejects_malformed_values(host):
    with pytest.raises(ValueError):
        guard.split_host(host)


@pytest.mark.parametrize("host, local, allowed, ok", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080), (), True),
    ("localhost:8080", ("127.0.0.1", 8080), (), True),
    ("[::1]:8080", ("127.0.0.1", 8080), (), True),
    ("localhost:8080", ("::ffff:127.0.0.1", 8080), (), True),
    ("localhost:8081", ("127.0.0.1", 8080), (), False),
    ("localhost", ("127.0.0.1", 8080), (), False),   # no port means 80
    ("localhost", ("127.0.0.1", 80), (), True),
    ("rebound.evil.example:8080", ("127.0.0.1", 8080), (), False),
    ("192.0.2.7:8080", ("192.0.2.7", 8080), (), True),       # the address the connection arrived on
    ("localhost:8080", ("192.0.2.7", 8080), (), False),       # not a loopback connection
    ("jobs.example", ("192.0.2.7", 8080), ("jobs.example",), True),
    ("jobs.example:443", ("192.0.2.7", 8080), ("jobs.example:443",), True),
    ("jobs.example:444", ("192.0.2.7", 8080), ("jobs.example:443",), False),
    (None, ("127.0.0.1", 8080), (), True),
    ("evil.example:8080", None, (), False),
])
def test_host_allowed(host, local, allowed, ok):
    assert guard.host_allowed(host, local, allowed) is ok


def test_cors_headers_only_for_listed_origins():
    assert guard.cors_headers("http://evil.example", frozenset()) == {}
    assert guard.cors_headers(None, frozenset({"*"})) == {}
    assert guard.cors_headers("http://evil.example", frozenset({"https://ui.example"})) == {}
    assert guard.cors_headers("https://ui.example", frozenset({"https://ui.example"}))["Access-Control-Allow-Origin"] \
        == "https://ui.example"
    assert guard.preflight_headers("http://evil.example", frozenset({"https://ui.example"})) == {}


@pytest.mark.parametrize("value, ok", [("application/json", True), ("Application/JSON; charset=utf-8", True),
                                       ("text/plain", False), ("application/json-seq", False), (None, False),
                                       ("", False)])
def test_is_json(value, ok):
    assert guard.is_json(value) is ok


@pytest.mark.parametrize("host, tokens, insecure, origins, refused", [
    ("127.0.0.1", False, False, (), False),
    ("localhost", False, False, (), False),
    ("::1", False, False, (), False),
    ("127.0.0.2", False, False, (), False),
    ("0.0.0.0", False, False, (), True),
    ("::", False, False, (), True),
    ("", False, False, (), True),
    ("192.0.2.7", False, False, (), True),
    ("build-host.example", False, False, (), True),
    ("0.0.0.0", True, False, (), False),
    ("0.0.0.0", False, True, (), False),
    ("127.0.0.1", False, False, ("*",), True),
    ("127.0.0.1", True, False, ("*",), False),
])
def test_exposure_problem(host, tokens, insecure, origins, refused):
    assert (guard.exposure_problem(host, tokens, insecure, origins) is not None) is refused


@pytest.mark.parametrize("origin, host, ok", [
    (None, "127.0.0.1:8080", True),
    ("https://ui.example", "127.0.0.1:8080", True),
    ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
    ("http://evil.example", "127.0.0.1:8080", False),
    ("null", "127.0.0.1:8080", False),
    ("http://127.0.0.1:8081", "127.0.0.1:8080", False),
    ("http://127.0.0.1:8080", None, False),
])
def test_origin_allowed(origin, host, ok):
    assert guard.origin_allowed(origin, host, frozenset({"https://ui.example"})) is ok
