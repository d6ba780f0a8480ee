"""Helpers for the Nomad job tests: parse rendered HCL with python-hcl2 and dig out the one job/group/task.

python-hcl2 (8.x) returns template escapes undecoded: `"$${x}"` parses to `$${x}`, not `${x}` (HashiCorp's Go
HCL parser decodes it). `untemplate` undoes exactly that HCL rule ("the `${` sequence is escaped as `$${` and the
`%{` sequence is escaped as `%%{`", hclsyntax spec). python-hcl2 also drops a heredoc's final newline, and cannot
parse `$${` without a later `}` or decode escapes between `$${` and `}`: those shapes are not checked here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import hcl2

from jobforge.config import JobConfig

_OPTIONS = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, preserve_heredocs=False,
                                     strip_string_quotes=True)
_ESCAPED_INTRODUCER = re.compile(r"\$\$\{|%%\{")


def load_hcl(text: str) -> dict[str, Any]:
    return hcl2.loads(text, serialization_options=_OPTIONS)


def untemplate(value: str) -> str:
    return _ESCAPED_INTRODUCER.sub(lambda m: m.group(0)[1:], value)


def labeled(blocks: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """`[{"label": {...}}]` (one labeled block) -> ("label", {...})."""
    assert len(blocks) == 1, blocks
    ((label, body),) = blocks[0].items()
    return label, body


@dataclass
class ParsedJob:
    name: str
    job: dict[str, Any]
    group_name: str
    group: dict[str, Any]
    task_name: str
    task: dict[str, Any]

    def templates(self) -> dict[str, dict[str, Any]]:
        return {t["destination"]: t for t in self.task.get("template", [])}

    def env(self) -> dict[str, str]:
        (env,) = self.task["env"]
        return {k: untemplate(v) for k, v in env.items()}


def parse_job(text: str) -> ParsedJob:
    doc = load_hcl(text)
    assert set(doc) == {"job"}
    name, job = labeled(doc["job"])
    group_name, group = labeled(job["group"])
    task_name, task = labeled(group["task"])
    return ParsedJob(name, job, group_name, group, task_name, task)


def make_config(**overrides: Any) -> JobConfig:
    base = {"owner": "team", "repo_url": "http://127.0.0.1:9418/hello.git", "image_name": "hello",
            "registry_url": "127.0.0.1:5000"}
    return JobConfig.model_validate({**base, **overrides})
