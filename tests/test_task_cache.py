"""The pure parts of the build's layer cache (templates/tasks/_cache.py): hit counting, its report, pruning plan,
sizes."""

from __future__ import annotations

import os

import pytest

from tests.support import taskscripts


@pytest.fixture(scope="module")
def cache():
    return taskscripts.load("_cache")


# Lines as buildah 1.28 prints them (seen in tests/test_tasks.py runs).
COLD_NODE = """STEP 1/4: FROM 127.0.0.1:5000/busybox:latest
STEP 2/4: RUN echo one > /one
--> Cache pulled from remote 127.0.0.1:5000/cache/app:51b7ac26c41708c1f89409e00206f9216970d34805412f813019e7e318e0d0e4
--> Using cache deb52750cb164970ad1d097d8db7e71e32439d58ff208df7f249e9488fa0a218
--> deb52750cb1
STEP 3/4: RUN echo two > /two
--> Pushing cache 127.0.0.1:5000/cache/app:8180ace991d3903f3b229dd9edcb64062b7e411e53b8b66c502d47ccbc186c52
--> 07d70f0599f
STEP 4/4: LABEL "jobforge.job-id"="987b943e326c4282aadeb5984f8f8e94"
--> e2fc31d7a1c
"""


def test_hits_and_misses_count_cacheable_steps_only(cache):
    counter = cache.HitCounter()
    for line in COLD_NODE.splitlines():
        counter.feed(line + "\n")
    assert (counter.hits, counter.misses) == (1, 1)  # FROM and the job's own label are not cacheable steps
    assert "deb52750cb164970ad1d097d8db7e71e32439d58ff208df7f249e9488fa0a218" in counter.used
    assert "07d70f0599f" in counter.used


def test_the_report_is_a_control_line_and_the_nonce_leaves_the_environment(cache, monkeypatch, capsys):
    common = taskscripts.load("_common")
    monkeypatch.setattr(common, "_nonce", [])
    counter = cache.HitCounter()
    for line in COLD_NODE.splitlines():
        counter.feed(line)
    cache.report(counter)
    assert capsys.readouterr().err == ""  # run by hand, without a nonce: no control line at all
    monkeypatch.setenv("NOMAD_META_control_nonce", "5f0c3d9e")  # as a Nomad dispatch hands it over
    common._take_nonce()
    assert "NOMAD_META_control_nonce" not in os.environ  # no tool started from here on inherits it
    cache.report(counter)
    assert capsys.readouterr().err == '::jobforge-5f0c3d9e cache {"hits": 1, "misses": 1}\n'


def test_a_dockerfile_label_is_counted(cache):
    counter = cache.HitCounter()
    counter.feed('STEP 2/2: LABEL "jobforge.job-id.fake"="x"')
    counter.feed("STEP 3/3: LABEL version=1")
    assert counter.misses == 2


def test_sizes_are_decimal_units(cache):
    assert cache.parse_size("2.13 MB") == 2_130_000
    assert cache.parse_size("1 GB") == 10**9
    assert cache.parse_size("512 B") == 512
    assert cache.parse_size("huge") == 0


def image(cache, image_id, size, created, *names):
    return cache.StoredImage(id=image_id, names=tuple(names), size=size, created=created)


def test_pruning_removes_least_recently_used_until_under_the_cap(cache):
    images = [image(cache, "a", 40, 100), image(cache, "b", 40, 200), image(cache, "c", 40, 300, "reg/app:1")]
    uses = {"a": 1000, "b": 500}  # a was used last; c was never used since it was created
    assert cache.prune_plan(images, uses, now=2000, ttl=None, max_bytes=80, recent=0) == ["c"]
    assert cache.prune_plan(images, uses, now=2000, ttl=None, max_bytes=40, recent=0) == ["c", "b"]
    assert cache.prune_plan(images, uses, now=2000, ttl=None, max_bytes=200, recent=0) == []
    assert cache.prune_plan(images, uses, now=2000, ttl=None, max_bytes=40, recent=1600) == ["c"]  # b: in use


def test_pruning_removes_unnamed_layers_unused_for_the_ttl_and_keeps_the_base_images(cache):
    images = [image(cache, "old", 1, 100), image(cache, "recent", 1, 1900), image(cache, "base", 1, 50, "busybox")]
    assert cache.prune_plan(images, {}, now=2000, ttl=1000, max_bytes=None, recent=0) == ["old"]
    assert cache.prune_plan(images, {"old": 1500}, now=2000, ttl=1000, max_bytes=None, recent=0) == []
    assert cache.prune_plan(images, {}, now=2000, ttl=None, max_bytes=1, keep=["busybox"], recent=0) == ["old",
                                                                                                        "recent"]


def test_uses_are_recorded_by_full_or_short_id_and_forgotten_when_gone(cache, tmp_path):
    stored = [image(cache, "abcdef0123", 1, 1), image(cache, "9876543210", 1, 1)]
    (tmp_path / cache.USES_FILE).write_text('{"gone": 5, "9876543210": 7}')
    cache.record_uses(str(tmp_path), ["abcdef"], stored, now=42)
    assert cache.read_uses(str(tmp_path)) == {"abcdef0123": 42, "9876543210": 7}


@pytest.mark.parametrize("ref, stored", [("alpine", "docker.io/library/alpine:latest"),
                                         ("alpine:3.19", "docker.io/library/alpine:3.19"),
                                         ("org/app", "docker.io/org/app:latest"),
                                         ("127.0.0.1:5000/busybox", "127.0.0.1:5000/busybox:latest"),
                                         ("registry.example/x:1", "registry.example/x:1")])
def test_a_dockerfile_reference_finds_its_stored_image(cache, ref, stored):
    images = [image(cache, "want", 1, 1, stored), image(cache, "other", 1, 1, "docker.io/library/other:latest")]
    assert cache.named(images, [ref]) == ["want"]
