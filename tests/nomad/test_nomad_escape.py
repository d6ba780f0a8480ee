"""jobforge.nomad.escape: every value survives HCL (and Go-template) escaping unchanged and inert."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobforge.nomad.escape import (HEREDOC_MARKER, Hcl, go_string, go_template_text, hcl_heredoc, hcl_literal,
                                   hcl_string)
from tests.nomad.helpers import load_hcl, untemplate

# Values python-hcl2 parses correctly (see conftest); each one is hostile to some layer.
HOSTILE = [
    'say "hi"',
    "${env}",
    "${env.HOME}/x",
    "%{if true}yes%{endif}",
    "%{ for x in y }${x}%{ endfor }",
    "$${already escaped}",
    "$$${triple}",
    "}} {{ .Data }} {{- end }}",
    '{{ "{{" }}',
    "back\\slash\\\\ and \\n literally",
    "\\${not an escape}",
    "line one\nline two\r\n\ttabbed",
    "nul \x00 bell \x07 del \x7f c1 \x85",
    "ünïcødé ☃ 😀",
    "\u2028 line separator",
    '"; exec sh; "',
    "",
]


def decode_template_literal(body: str, *, backslash_escapes: bool) -> str:
    """Decode HCL template literal text per the hclsyntax spec ("Template Expressions").

    `$${`/`%%{` are literal `${`/`%{`; a bare `${`/`%{` would start an interpolation/directive (an error here).
    Quoted strings (`backslash_escapes`) also decode `\\n \\r \\t \\" \\\\ \\uNNNN \\UNNNNNNNN` and may hold no
    raw newline or quote."""
    out, i = [], 0
    simple = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
    while i < len(body):
        if backslash_escapes and body[i] == "\\":
            kind = body[i + 1]
            if kind in simple:
                out.append(simple[kind])
                i += 2
            elif kind in "uU":
                width = 4 if kind == "u" else 8
                out.append(chr(int(body[i + 2:i + 2 + width], 16)))
                i += 2 + width
            else:
                raise AssertionError(f"unknown escape \\{kind}")
        elif body.startswith(("$${", "%%{"), i):
            out.append(body[i + 1:i + 3])
            i += 3
        elif body.startswith(("${", "%{"), i):
            raise AssertionError(f"template sequence at {i}: {body!r}")
        elif backslash_escapes and body[i] in '"\n':
            raise AssertionError(f"raw {body[i]!r} at {i}")
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def decode_quoted(literal: str) -> str:
    assert literal[:1] == '"' and literal[-1:] == '"', literal
    return decode_template_literal(literal[1:-1], backslash_escapes=True)


def decode_heredoc(heredoc: str) -> str:
    first, rest = heredoc.split("\n", 1)
    assert first == f"<<{HEREDOC_MARKER}"
    body, last = rest.rsplit("\n", 1)
    assert last == HEREDOC_MARKER
    return decode_template_literal(body + "\n", backslash_escapes=False)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_strings_parse_back_unchanged_with_python_hcl2(value):
    doc = load_hcl(f"a = {hcl_string(value)}\nb = [{hcl_string(value)}, \"after\"]\n")
    assert untemplate(doc["a"]) == value
    assert [untemplate(v) for v in doc["b"]] == [value, "after"]


@pytest.mark.parametrize("value", HOSTILE + ["${", "%{", "a${b\"c}", "${\n}"])
def test_hostile_strings_decode_per_hcl_spec(value):
    assert decode_quoted(hcl_string(value)) == value


@given(st.text(alphabet=st.characters(exclude_categories=("Cs",))))
def test_any_string_round_trips_and_stays_inert(value):
    literal = hcl_string(value)
    assert decode_quoted(literal) == value
    assert "\n" not in literal and "\r" not in literal


@given(st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="${}%")))
def test_any_string_without_template_characters_round_trips_through_python_hcl2(value):
    assert load_hcl(f"a = {hcl_string(value)}\n")["a"] == value


def test_expected_escapes_are_literal():
    assert hcl_string('a"b\\c\n${x}%{y}') == '"a\\"b\\\\c\\n$${x}%%{y}"'
    assert hcl_string("\x01\x7f") == '"\\u0001\\u007f"'


def test_lone_surrogates_are_refused():
    with pytest.raises(ValueError, match="surrogate"):
        hcl_string("\ud800")


def test_literals_of_each_type():
    assert hcl_literal(True) == "true"
    assert hcl_literal(False) == "false"
    assert hcl_literal(2048) == "2048"
    assert hcl_literal(["a", "${b}"]) == '["a", "$${b}"]'
    assert hcl_literal(("x",)) == '["x"]'
    assert hcl_literal({"k": "v"}) == '{"k" = "v"}'
    marked = Hcl("<<EOF\nraw\nEOF")
    assert hcl_literal(marked) is marked
    for bad in (None, 1.5, object()):
        with pytest.raises(TypeError):
            hcl_literal(bad)


# ------------------------------------------------------------------------------------------------ heredocs

SCRIPTLIKE = (
    '#!/usr/bin/env python3\n'
    'print(f"{{literal braces}} ${HOME} %{x} $${y} \\n stays")\n'
    '    indented = "EOT"  # not the marker\n'
    "last line\n"
)


def test_heredoc_parses_back_to_the_text():
    doc = load_hcl(f"data = {hcl_heredoc(SCRIPTLIKE)}\n")
    # python-hcl2 drops the heredoc's final newline (Go HCL keeps it).
    assert untemplate(doc["data"]) + "\n" == SCRIPTLIKE


def test_heredoc_escapes_only_template_introducers():
    assert decode_heredoc(hcl_heredoc(SCRIPTLIKE)) == SCRIPTLIKE
    assert "\\n stays" in hcl_heredoc(SCRIPTLIKE)  # heredocs have no backslash escapes: kept verbatim


heredoc_text = st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc"), include_characters="\t${}%"))
                        .filter(lambda line: line.strip() != HEREDOC_MARKER), min_size=1).map(
    lambda lines: "\n".join(lines) + "\n")


@given(heredoc_text)
def test_any_multiline_text_round_trips_through_a_heredoc(text):
    assert decode_heredoc(hcl_heredoc(text)) == text


@pytest.mark.parametrize("text, error", [
    ("no trailing newline", "end with a newline"),
    ("a\nJOBFORGE_EOF\nb\n", "marker"),
    ("a\n   JOBFORGE_EOF  \n", "marker"),
    ("carriage\r\nreturn\n", "control"),
    ("bell\x07\n", "control"),
])
def test_heredoc_refuses_what_it_cannot_carry_exactly(text, error):
    with pytest.raises(ValueError, match=error):
        hcl_heredoc(text)


# ------------------------------------------------------------------------------------------------ Go templates

ESCAPED_ACTION = '{{"{{"}}'


def go_render_literal_actions(text: str) -> str:
    """What Go's text/template outputs for text whose only actions are `{{"{{"}}` (prints `{{`)."""
    assert "{{" not in text.replace(ESCAPED_ACTION, ""), "an action other than the escape"
    return text.replace(ESCAPED_ACTION, "{{")


@pytest.mark.parametrize("text", ["plain", "{{ .Data }}", "{{{", "{{{{", "}}{{", "f'{{{x}}}'", "{{- trim -}}"])
def test_go_template_text_renders_back_to_itself(text):
    escaped = go_template_text(text)
    assert go_render_literal_actions(escaped) == text


@given(st.text(alphabet="{}$%\"ab\n"))
def test_go_template_text_leaves_no_other_action(text):
    assert go_render_literal_actions(go_template_text(text)) == text


def test_go_then_hcl_escaping_compose():
    """The renderer's order: Go-template escaping inside, HCL outside."""
    text = "x = '${{a}}' and '%{{b}}'\n"
    doc = load_hcl(f"data = {hcl_heredoc(go_template_text(text))}\n")
    assert go_render_literal_actions(untemplate(doc["data"]) + "\n") == text


@pytest.mark.parametrize("value", ["secret/data/app", 'a"b', "back\\slash", "}} {{ end }}", "ü😀", "new\nline"])
def test_go_string_is_a_quoted_literal(value):
    literal = go_string(value)
    assert json.loads(literal) == value
    assert "\\ud8" not in literal.lower()  # Go rejects surrogate-pair escapes; non-ASCII stays literal
    assert literal.count('"') - literal.count('\\"') == 2
