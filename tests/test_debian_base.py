"""The Debian mirror the self-build test bootstraps from is the one apt uses here (the only one reachable)."""

from __future__ import annotations

from tests.support.debian_base import DEFAULT_MIRROR, apt_mirror


def test_the_mirror_comes_from_apts_deb822_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("JOBFORGE_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    assert apt_mirror(tmp_path) == "http://mirror.example/debian"


def test_one_line_sources_and_the_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv("JOBFORGE_DEBIAN_MIRROR", raising=False)
    assert apt_mirror(tmp_path) == DEFAULT_MIRROR
    (tmp_path / "sources.list").write_text("deb http://other.example/debian bookworm main\n")
    assert apt_mirror(tmp_path) == "http://other.example/debian"
    monkeypatch.setenv("JOBFORGE_DEBIAN_MIRROR", "http://override.example/debian")
    assert apt_mirror(tmp_path) == "http://override.example/debian"
