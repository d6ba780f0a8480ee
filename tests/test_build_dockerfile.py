"""The images the build phase pulls before a sandboxed `buildah bud --pull=never` (templates/tasks/build.py)."""

from __future__ import annotations

import pytest

from tests.support import taskscripts


@pytest.fixture(scope="module")
def build():
    return taskscripts.load("build")


DOCKERFILE = """# syntax comment
ARG BASE_IMAGE
ARG OTHER="reg.example/x:1"
FROM ${BASE_IMAGE} AS base
RUN echo one \\
  && echo two
FROM --platform=linux/amd64 $OTHER
COPY --from=base /a /b
COPY --from=reg.example/y:2 /a /b
RUN --mount=type=bind,from=reg.example/z,target=/z true
FROM scratch
FROM ${MISSING:-reg.example/default:3}
COPY --from=0 /a /b
FROM base
"""


def test_base_images_substitutes_args_and_skips_stages(build):
    images = build.base_images(DOCKERFILE, {"BASE_IMAGE": "127.0.0.1:5000/busybox:latest"})
    assert images == ["127.0.0.1:5000/busybox:latest", "reg.example/x:1", "reg.example/y:2", "reg.example/z",
                      "reg.example/default:3"]


def test_build_args_override_arg_defaults(build):
    assert build.base_images("ARG IMG=a/b:1\nFROM $IMG\n", {"IMG": "c/d:2"}) == ["c/d:2"]
    assert build.base_images("ARG IMG=a/b:1\nFROM $IMG\n", {}) == ["a/b:1"]
