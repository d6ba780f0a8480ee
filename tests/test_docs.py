"""Docs that are derived from code stay derived."""

from __future__ import annotations

import re
from pathlib import Path

from jobforge.pipeline import transition_table
from tests.support import taskscripts

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_architecture_doc_embeds_the_current_transition_table():
    text = (DOCS / "architecture.md").read_text()
    embedded = text.split("<!-- transition-table -->\n", 1)[1].split("\n<!-- /transition-table -->", 1)[0]
    assert embedded == transition_table()


def test_api_doc_lists_every_method():
    from jobforge.models import METHODS
    text = (DOCS / "api.md").read_text()
    assert all(f"`{name}`" in text for name in METHODS)


def test_security_doc_lists_exactly_the_variables_tools_start_with():
    common = taskscripts.load("_common")
    text = (DOCS / "security.md").read_text()
    listed = text.split("<!-- tool-env -->", 1)[1].split("<!-- /tool-env -->", 1)[0]
    expected = {*common.TOOL_ENV, *(prefix + "*" for prefix in common.TOOL_ENV_PREFIXES)}
    assert set(re.findall(r"`([^`]+)`", listed)) == expected
