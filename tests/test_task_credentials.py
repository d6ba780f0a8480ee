"""The credential-binding rules of the task scripts (templates/tasks/_common.py, stdlib only): pure functions,
loaded from the directory the service runs them from (tests/support/taskscripts.py)."""

from __future__ import annotations


import pytest

from jobforge.tasks import templates_dir
from tests.support import taskscripts

c = taskscripts.load("_common")
split_url_credential = taskscripts.load("build").split_url_credential

STORE = """https://alice:a%40pw@git.example
https://bob:b-pw@git.example:8443
http://carol:c-pw@127.0.0.1:9000
not a url
https://no-password@git.example
"""


def test_credential_store_lines_are_parsed_like_git():
    creds = c.parse_credential_store(STORE)
    assert [(x.origin, x.username, x.password) for x in creds] == [
        (c.Origin("https", "git.example", 443), "alice", "a@pw"),
        (c.Origin("https", "git.example", 8443), "bob", "b-pw"),
        (c.Origin("http", "127.0.0.1", 9000), "carol", "c-pw"),
    ]


@pytest.mark.parametrize(("url", "plain", "user"), [
    ("https://git.example/org/app.git", [], "alice"),
    ("https://GIT.example:443/org/app.git", [], "alice"),
    ("https://git.example:8443/app.git", [], "bob"),
    ("https://git.example:8444/app.git", [], None),        # another port
    ("http://git.example/app.git", ["git.example"], None),  # another scheme: the https credential stays home
    ("https://evil.example/git.example", [], None),
    ("https://git.example.evil.example/app.git", [], None),
    ("https://git.example@evil.example/app.git", [], None),
    ("http://127.0.0.1:9000/r.git", [], None),              # plain http, host not listed
    ("http://127.0.0.1:9000/r.git", ["127.0.0.1:9001"], None),
    ("http://127.0.0.1:9000/r.git", ["127.0.0.1:9000"], "carol"),
    ("http://127.0.0.1:9000/r.git", ["127.0.0.1"], "carol"),
    ("ssh://git@git.example/app.git", [], None),
    ("git@git.example:org/app.git", [], None),
    ("file:///srv/git.example", [], None),
])
def test_a_credential_goes_only_to_its_own_origin(url, plain, user):
    found = c.git_credential_for(url, c.parse_credential_store(STORE), plain)
    assert (found.username if found else None) == user


def test_a_username_password_bound_to_a_host():
    creds = c.host_credentials("git.example:8443", "svc", "pw")
    assert c.git_credential_for("https://git.example:8443/a.git", creds).username == "svc"
    assert c.git_credential_for("https://git.example/a.git", creds) is None
    assert c.git_credential_for("http://git.example:8443/a.git", creds) is None
    assert c.git_credential_for("http://git.example:8443/a.git", creds, ["git.example"]).username == "svc"
    assert c.host_credentials(None, "svc", "pw") == [] and c.host_credentials("h", None, "pw") == []


def test_registry_entries_are_chosen_by_exact_host():
    auths = {"127.0.0.1:5000": {"auth": "a"}, "127.0.0.1:5000/team": {"auth": "b"}, "127.0.0.1": {"auth": "c"},
             "https://index.docker.io/v1/": {"auth": "d"}, "127.0.0.1:50000": {"auth": "e"}}
    assert c.registry_auths_for(auths, ["127.0.0.1:5000"]) == {"127.0.0.1:5000": {"auth": "a"},
                                                               "127.0.0.1:5000/team": {"auth": "b"}}
    assert c.registry_auths_for(auths, ["index.docker.io"]) == {"https://index.docker.io/v1/": {"auth": "d"}}
    assert c.registry_auths_for(auths, ["evil.example:5000"]) == {}


def test_tls_is_off_only_for_the_service_registry_and_listed_hosts():
    ctx = c.Context(payload={"temp_image": "127.0.0.1:5000/temp-a:1", "tls_verify": False,
                             "insecure_registries": ["mirror.example:5001"]},
                    workdir="/tmp", storage_driver="vfs", root=None, runroot=None, isolation="chroot")
    assert ctx.tls_verify_for("127.0.0.1:5000/a:1") is False
    assert ctx.tls_verify_for("mirror.example:5001/a:1") is False
    assert ctx.tls_verify_for("evil.example:5000/a:1") is True
    assert ctx.tls_verify_for("127.0.0.1:5001/a:1") is True


def test_a_password_in_the_url_is_taken_out_and_bound_to_that_url():
    url, cred = split_url_credential("https://ci:p%2Fw@git.example:8443/org/app.git")
    assert url == "https://git.example:8443/org/app.git"
    assert (cred.origin, cred.username, cred.password) == (c.Origin("https", "git.example", 8443), "ci", "p/w")
    assert split_url_credential("https://ci@git.example/a.git") == ("https://ci@git.example/a.git", None)
    assert split_url_credential("ssh://git:pw@git.example/a.git") == ("ssh://git.example/a.git", None)


def test_tools_never_inherit_credential_variables(monkeypatch):
    for name in ("REGISTRY_PASSWORD", "REGISTRY_AUTH_FILE", "GIT_PASSWORD", "JOBFORGE_SECRET_X", "DOCKER_CONFIG"):
        monkeypatch.setenv(name, "v")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = c.tool_env()
    assert env["LANG"] == "C.UTF-8"
    assert not {"REGISTRY_PASSWORD", "REGISTRY_AUTH_FILE", "GIT_PASSWORD", "JOBFORGE_SECRET_X", "DOCKER_CONFIG"} & set(env)


def test_tools_start_with_the_allow_list_only(monkeypatch):
    """Not a credential either, still the service's or the runner's: settings, host paths, proxies, Nomad's."""
    dropped = ("FOO_SERVICE", "JOBFORGE_GIT_CREDENTIAL_HOST", "JOBFORGE_GIT_PLAIN_HTTP_HOSTS", "JOBFORGE_BUILDAH_ROOT",
               "JOBFORGE_PAYLOAD", "NOMAD_TASK_DIR", "HTTPS_PROXY", "http_proxy", "BUILDAH_ISOLATION", "USER")
    kept = {"PATH": "/usr/bin:/bin", "HOME": "/home/b", "LC_CTYPE": "C.UTF-8", "TMPDIR": "/var/tmp",
            "_CONTAINERS_USERNS_CONFIGURED": "done", "_CONTAINERS_ROOTLESS_UID": "999",
            "CONTAINERS_STORAGE_CONF": "/etc/runner/storage.conf"}
    monkeypatch.setattr(c.os, "environ", {**{name: "marker" for name in dropped}, **kept})
    assert c.tool_env() == kept


def test_the_task_scripts_define_each_name_once():
    """A second `def tool_env` further down once silently replaced the allow-list with a deny-list."""
    import ast
    from collections import Counter

    for script in sorted((templates_dir() / "tasks").glob("*.py")):
        tree = ast.parse(script.read_text(encoding="utf-8"))
        names = Counter(node.name for node in tree.body
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
        names.update(target.id for node in tree.body if isinstance(node, ast.Assign)
                     for target in node.targets if isinstance(target, ast.Name))
        assert [name for name, count in names.items() if count > 1] == [], script.name


def test_build_registries_conf_marks_exactly_the_insecure_hosts():
    system = 'unqualified-search-registries = ["docker.io"]\n'
    text = c.registries_conf_text(system, ["127.0.0.1:5000", "mirror.example"])
    assert text.startswith(system)
    assert text.count("insecure = true") == 2
    assert 'location = "127.0.0.1:5000"' in text and 'location = "mirror.example"' in text
    assert c.registries_conf_text(system, []) == system
    # v1 files cannot be mixed with v2 tables: left out
    assert "registries.search" not in c.registries_conf_text("[registries.search]\nregistries = []\n", ["h:1"])


@pytest.mark.parametrize(("url", "ssh"), [
    ("ssh://git@git.example/app.git", True), ("SSH://git.example:2222/app.git", True),
    ("git@git.example:org/app.git", True), ("git.example:org/app.git", True),
    ("https://git.example/app.git", False), ("git://git.example/app.git", False), ("file:///srv/a:b", False),
    ("/srv/repos/a:b", False), ("./a:b", False),
])
def test_which_urls_git_fetches_over_ssh(url, ssh):
    assert c.is_ssh_url(url) is ssh


def test_the_ssh_command_offers_only_the_given_key_and_survives_the_shell(monkeypatch):
    import shlex
    argv = shlex.split(c.ssh_command("/w d/.git-ssh-key", "/w d/.known", strict=True))
    assert argv[:3] == ["ssh", "-F", "/dev/null"] and argv[argv.index("-i") + 1] == "/w d/.git-ssh-key"
    options = {argv[i + 1] for i, word in enumerate(argv) if word == "-o"}
    assert {"IdentitiesOnly=yes", "IdentityAgent=none", "BatchMode=yes", "StrictHostKeyChecking=yes",
            "UserKnownHostsFile=/w d/.known"} <= options
    assert "StrictHostKeyChecking=accept-new" in c.ssh_command("/k", "/h", strict=False)
    monkeypatch.setenv("JOBFORGE_JOB_GIT_SSH_KEY", "key")
    monkeypatch.setenv("JOBFORGE_JOB_GIT_KNOWN_HOSTS", "hosts")
    assert not {"JOBFORGE_JOB_GIT_SSH_KEY", "JOBFORGE_JOB_GIT_KNOWN_HOSTS"} & set(c.tool_env())  # git never sees it
