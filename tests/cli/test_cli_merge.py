"""Config input and the deep merge (cli.merge)."""

from __future__ import annotations

import io

import pytest

from jobforge_cli.merge import add_tags, deep_merge, load_source, merged_config, split_tags
from jobforge.errors import ConfigError

GLOBAL = {
    "owner": "team", "image_name": "app", "clear_cache": True, "image_tags": ["a", "b"],
    "test": {"entry_point": True, "env": {"A": "1", "B": "2"}, "commands": ["x", "y"]},
    "resource_limits": {"cpu": 500, "build": {"cpu": 2000, "memory": 4096}},
}


def test_nested_mappings_merge_and_per_build_wins_per_key():
    merged = deep_merge(GLOBAL, {"test": {"env": {"B": "two", "C": "3"}}, "resource_limits": {"build": {"cpu": 1}}})
    assert merged["test"] == {"entry_point": True, "env": {"A": "1", "B": "two", "C": "3"}, "commands": ["x", "y"]}
    assert merged["resource_limits"] == {"cpu": 500, "build": {"cpu": 1, "memory": 4096}}


@pytest.mark.parametrize("override", [
    {"clear_cache": False}, {"test": {"entry_point": False}}, {"resource_limits": {"cpu": 0}},
    {"image_name": ""}, {"test": {"env": {}}}, {"test": None},
])
def test_explicit_false_zero_empty_and_null_override(override):
    merged = deep_merge(GLOBAL, override)
    key, value = next(iter(override.items()))
    if isinstance(value, dict) and value:
        inner_key, inner_value = next(iter(value.items()))
        assert merged[key][inner_key] == inner_value
    else:
        assert merged[key] == value


def test_lists_are_replaced_whole():
    merged = deep_merge(GLOBAL, {"image_tags": ["c"], "test": {"commands": []}})
    assert merged["image_tags"] == ["c"]
    assert merged["test"]["commands"] == []


def test_merge_does_not_mutate_its_inputs():
    before = repr(GLOBAL)
    merged = deep_merge(GLOBAL, {"test": {"env": {"Z": "9"}}})
    merged["test"]["commands"].append("mutated")
    assert repr(GLOBAL) == before


def test_image_tags_flag_appends_split_and_deduplicated():
    assert split_tags(["v1, latest", "latest,", "x"]) == ["v1", "latest", "latest", "x"]
    assert add_tags({"image_tags": ["a", "v1"]}, ["v1", "latest"])["image_tags"] == ["a", "v1", "latest"]
    assert add_tags({}, ["x"])["image_tags"] == ["x"]


def test_sources_file_inline_yaml_inline_json_and_stdin(tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text("git_ref: feature/x\nimage_tags: [t]\n")
    assert load_source(str(path), io.StringIO()) == {"git_ref": "feature/x", "image_tags": ["t"]}
    assert load_source("git_ref: dev", io.StringIO()) == {"git_ref": "dev"}
    assert load_source('{"git_ref": "dev", "clear_cache": false}', io.StringIO()) == {"git_ref": "dev",
                                                                                     "clear_cache": False}
    assert load_source(None, io.StringIO("owner: me\n")) == {"owner": "me"}
    assert load_source("-", io.StringIO('{"owner": "me"}')) == {"owner": "me"}


@pytest.mark.parametrize("source, message", [
    ("missing.yaml", "no such file"),
    ("- a\n- b\n", "must be a mapping"),
    ("owner: [unclosed", "not valid YAML"),
])
def test_bad_sources_are_config_errors(source, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_source(source, io.StringIO())


def test_merged_config_global_then_per_build_then_flag_tags(tmp_path):
    g = tmp_path / "global.yaml"
    g.write_text("owner: team\nimage_tags: [a]\ntest: {entry_point: true, env: {A: '1'}}\n")
    merged = merged_config("{test: {env: {B: '2'}}, image_tags: [b]}", str(g), ["c,d"], io.StringIO())
    assert merged == {"owner": "team", "image_tags": ["b", "c", "d"],
                      "test": {"entry_point": True, "env": {"A": "1", "B": "2"}}}
