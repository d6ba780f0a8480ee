"""consul_template.py (the evaluator both doubles render with) against our Nomad jobs, the reference samples, the
FakeVault it reads, and go-envparse.

Expected values are literals, the reference samples, the task scripts in templates/tasks/, or the go-envparse
README; never computed by the evaluator.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jobforge.nomad.render import render_job
from jobforge.nomad.variants import SecretSpec, default_spec, variant_spec
from jobforge.tasks import task_script
from tests.doubles.consul_template import (
    EnvFileError,
    SecretUnavailable,
    TemplateError,
    UnsupportedTemplate,
    parse_env_file,
    render_env_template,
    render_template,
)
from tests.doubles.vault import FakeVault
from tests.nomad.helpers import make_config, parse_job, untemplate

ROOT = Path(__file__).resolve().parents[2]
NOMAD_SAMPLES = ROOT / "tests" / "reference" / "nomad-samples"


# ---------------------------------------------------------------- templates: our jobs

@pytest.mark.parametrize("hcl", sorted(p for p in (ROOT / "nomad-jobs").glob("*.hcl")
                                        if p.name != "jobforge-service.nomad.hcl"),  # tests/nomad/test_service_job.py
                         ids=lambda p: p.name)
def test_the_committed_jobs_render_their_task_scripts_byte_for_byte(hcl):
    """The default jobs read no Vault; their templates are the task scripts with `{{"{{"}}` escapes."""
    fake = FakeVault()
    templates = parse_job(hcl.read_text()).templates()
    assert templates and not any(t.get("env") for t in templates.values())
    for destination, template in templates.items():
        data = untemplate(template["data"]) + "\n"  # python-hcl2 drops the heredoc's final newline
        script = task_script(Path(destination).stem).read_text()
        assert render_template(data, fake) == script, destination
    assert fake.seen == []


VAULT_CONFIG = make_config(
    git_credentials_path="secret/nomad/jobs/git-credentials",  # the reference's path: no data/
    registry_credentials_path="secret/data/nomad/jobs/registry-credentials",
    test={"entry_point": True, "vault_policies": ["jobs"], "vault_secrets": [
        {"path": "secret/data/aws/transcription",
         "fields": {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY"}},
        {"path": "secret/data/ml/api-keys", "fields": {"hf-token": "HUGGING_FACE_HUB_TOKEN"}}]})
# The job's own credentials and secrets, under names the service itself never sets (docs/security.md).
REGISTRY_ENV = {"JOBFORGE_JOB_REGISTRY_USERNAME": "ci", "JOBFORGE_JOB_REGISTRY_PASSWORD": 'p@ss "word"\n#1'}
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
PHASE_ENV = {
    "build": {"JOBFORGE_JOB_GIT_USERNAME": "git-bot", "JOBFORGE_JOB_GIT_PASSWORD": "tok'en}}{{",
              "JOBFORGE_JOB_GIT_SSH_KEY": SSH_KEY, **REGISTRY_ENV},
    "test": {**REGISTRY_ENV, "JOBFORGE_SECRET_AWS_ACCESS_KEY_ID": "AKIA",
             "JOBFORGE_SECRET_AWS_SECRET_ACCESS_KEY": "s/e+c=r<e>t&",
             "JOBFORGE_SECRET_HUGGING_FACE_HUB_TOKEN": "hf_\u2028x"},
    "publish": REGISTRY_ENV, "cleanup": REGISTRY_ENV,
}


def seed_job_secrets(fake: FakeVault) -> None:
    fake.put("nomad/jobs/git-credentials", {"username": "git-bot", "password": "tok'en}}{{", "ssh_key": SSH_KEY})
    fake.put("nomad/jobs/registry-credentials", {"username": "ci", "password": 'p@ss "word"\n#1'})
    fake.put("aws/transcription", {"access_key_id": "AKIA", "secret_access_key": "s/e+c=r<e>t&"})
    fake.put("ml/api-keys", {"hf-token": "hf_\u2028x", "unused": "x"})
    fake.add_token("job", {"secret/data/nomad/jobs/*": ["read"], "secret/data/aws/*": ["read"],
                           "secret/data/ml/*": ["read"]})


def env_templates(phase: str, spec=None) -> list[str]:
    job = parse_job(render_job(phase, spec if spec is not None else variant_spec(phase, VAULT_CONFIG)))
    return [untemplate(t["data"]) for t in job.templates().values() if t.get("env")]


@pytest.mark.parametrize("phase", sorted(PHASE_ENV))
def test_rendered_vault_jobs_give_the_task_exactly_its_secrets(phase):
    fake = FakeVault()
    seed_job_secrets(fake)
    env: dict[str, str] = {}
    for text in env_templates(phase):
        env |= render_env_template(text, fake, token="job")
    assert env == PHASE_ENV[phase]
    reads = [s.path for s in fake.seen if not s.path.startswith("sys/")]
    if phase == "build":  # consul-template inserted data/ after the KV v2 mount
        assert "secret/data/nomad/jobs/git-credentials" in reads
    assert all("/data/" in path for path in reads)


def test_the_docs_example_template_renders():
    docs = (ROOT / "docs" / "nomad.md").read_text()
    (text,) = re.findall(r"```\n(\{\{ with secret .*?)```", docs, re.DOTALL)
    fake = FakeVault()
    fake.put("aws/transcription", {"access_key_id": "AKIA#1 \"x\""})
    assert render_env_template(text, fake) == {"JOBFORGE_SECRET_AWS_ACCESS_KEY_ID": "AKIA#1 \"x\""}


def test_the_policy_decides_which_secrets_a_job_can_render():
    fake = FakeVault()
    seed_job_secrets(fake)
    aws, ml = env_templates("test")[1:]
    fake.add_token("aws-only", {"secret/data/aws/*": ["read"]})
    assert render_env_template(aws, fake, token="aws-only") == {
        "JOBFORGE_SECRET_AWS_ACCESS_KEY_ID": "AKIA", "JOBFORGE_SECRET_AWS_SECRET_ACCESS_KEY": "s/e+c=r<e>t&"}
    with pytest.raises(SecretUnavailable, match="Code: 403"):
        render_env_template(ml, fake, token="aws-only")
    # A policy written on the logical path (no data/) passes the preflight but not the read.
    fake.add_token("v1-style", {"secret/aws/*": ["read"]})
    with pytest.raises(SecretUnavailable, match="secret/data/aws/transcription Code: 403"):
        render_env_template(aws, fake, token="v1-style")
    with pytest.raises(SecretUnavailable, match="Code: 403"):
        render_env_template(aws, fake, token="")  # no token at all


def test_missing_deleted_and_destroyed_secrets():
    fake = FakeVault()
    text = '{{ with secret "secret/data/app" }}{{ with index .Data.data "a" }}A={{ . | toJSON }}{{ end }}{{ end }}'
    with pytest.raises(SecretUnavailable, match="no secret exists at secret/data/app"):
        render_env_template(text, fake)
    fake.put("app", {"a": "1"})
    assert render_env_template(text, fake) == {"A": "1"}
    fake.handle("DELETE", "secret/data/app", token="root")
    with pytest.raises(SecretUnavailable, match="no secret exists at secret/data/app"):
        render_env_template(text, fake)
    fake.put("app", {"a": "2"})
    fake.handle("PUT", "secret/destroy/app", token="root", body=b'{"versions": [2]}')
    with pytest.raises(TemplateError, match="index of untyped nil"):  # destroyed, not deleted: the read "works"
        render_env_template(text, fake)


# ---------------------------------------------------------------- templates: the reference samples

def nomad_sample(name: str):
    path = NOMAD_SAMPLES / name
    assert path.is_file(), f"reference sample missing: {path} (tests/reference holds copies of shared/reference)"
    return json.loads(path.read_text())


def test_the_nomad_sample_template_renders_with_the_task_environment():
    (tmpl,) = nomad_sample("parameterized-job.json")["Job"]["TaskGroups"][0]["Tasks"][0]["Templates"]
    fake = FakeVault()
    fake.put("report-runner/config", {"db_password": 'p"w', "api_key": "k"})
    text = render_template(tmpl["EmbeddedTmpl"], fake, env={"NOMAD_META_run_id": "7"})
    assert text == '\nDB_PASSWORD="p\\"w"\nAPI_KEY="k"\n\nRUN_ID=7\n'
    assert parse_env_file(text) == {"DB_PASSWORD": 'p"w', "API_KEY": "k", "RUN_ID": "7"}
    with pytest.raises(UnsupportedTemplate, match="task environment"):
        render_template(tmpl["EmbeddedTmpl"], fake)  # without the task environment `env` is not guessed


def test_field_chains_follow_text_template():
    fake = FakeVault()
    fake.put("x", {"a": "1"})
    text = '{{ with secret "secret/x" }}A={{ .Data.data.a | toJSON }} M={{ .Data.data.missing | toJSON }}{{ end }}'
    assert render_template(text, fake) == 'A="1" M='  # missingkey=zero: nil, which toJSON writes as ""
    fake.handle("PUT", "secret/destroy/x", token="root", body=b'{"versions": [1]}')
    with pytest.raises(TemplateError, match=r"nil pointer evaluating interface \{\}\.a"):
        render_template(text, fake)


# ---------------------------------------------------------------- templates: hostile names and values

HOSTILE_VALUES = [
    'quo"te', "back\\slash", "new\nline", "crlf\r\n", "tab\tand\vfeed\f", "# not a comment", "x # not either",
    "}} {{ end }}", '{{ . | toJSON }}', "<script>&amp;</script>", "\u2028\u2029", "\x00\x01\x1b\x1f\x7f",
    "emoji \U0001f511 ünïcödé", "  padded  ", "=", "export X=1", "'single'", "\\u0041 is not A", "\\", '"',
    "$HOME ${HOME} %{x}", "x" * 65531,
]


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
def test_hostile_values_come_out_byte_exact(value):
    fake = FakeVault()
    fake.put("hostile", {"v": value})
    text = '{{ with secret "secret/hostile" }}\n{{- with index .Data.data "v" }}\nV={{ . | toJSON }}\n{{- end }}\n{{ end }}\n'
    assert render_env_template(text, fake) == {"V": value}


def test_a_value_too_long_for_nomads_env_parser_fails_the_task():
    fake = FakeVault()
    fake.put("long", {"v": "x" * 65532})  # `V="..."` is then 65536 bytes: bufio.Scanner's limit
    text = '{{ with secret "secret/long" }}{{ with index .Data.data "v" }}V={{ . | toJSON }}{{ end }}{{ end }}'
    with pytest.raises(EnvFileError, match="token too long"):
        render_env_template(text, fake)


HOSTILE_FIELDS = r'''{{ with secret "secret/data/fields" }}
{{- with index .Data.data "we\"ird" }}
QUOTE={{ . | toJSON }}
{{- end }}
{{- with index .Data.data "}}" }}
CLOSE={{ . | toJSON }}
{{- end }}
{{- with index .Data.data "a\nb" }}
NEWLINE={{ . | toJSON }}
{{- end }}
{{- with index .Data.data "\u00fcber \x41\101" }}
ESCAPED={{ . | toJSON }}
{{- end }}
{{- with index .Data.data "{{ end }}" }}
ACTION={{ . | toJSON }}
{{- end }}
{{ end }}
'''


def test_hostile_field_names_written_by_hand():
    fake = FakeVault()
    fake.put("fields", {'we"ird': "1", "}}": "2", "a\nb": "3", "über AA": "4", "{{ end }}": "5", "plain": "6"})
    assert render_env_template(HOSTILE_FIELDS, fake) == {
        "QUOTE": "1", "CLOSE": "2", "NEWLINE": "3", "ESCAPED": "4", "ACTION": "5"}


def test_hostile_field_names_through_the_job_renderer():
    fields = (('f"}}\n{{ end }}', "F1"), ("\\", "F2"), ("ü\u2028", "F3"), ("missing", "F4"))
    spec = default_spec("test").model_copy(update={"vault_secrets": (SecretSpec(path="secret/data/h", fields=fields),)})
    (text,) = env_templates("test", spec)
    fake = FakeVault()
    fake.put("h", {'f"}}\n{{ end }}': "v1", "\\": "v2", "ü\u2028": "v3"})
    assert render_env_template(text, fake) == {  # F4: missing field, unset
        "JOBFORGE_SECRET_F1": "v1", "JOBFORGE_SECRET_F2": "v2", "JOBFORGE_SECRET_F3": "v3"}


def test_values_that_are_not_strings():
    fake = FakeVault()
    fake.put("typed", {"zero": 0, "true": True, "false": False, "null": None, "empty": "", "float": 1.50,
                       "obj": {"k": "v w", "n": 1}, "list": ["a", 1], "emptyobj": {}, "big": 12345678901234567890})
    names = ["zero", "true", "false", "null", "empty", "float", "obj", "list", "emptyobj", "big"]
    text = '{{ with secret "secret/typed" }}' + "".join(
        f'{{{{ with index .Data.data "{n}" }}}}\n{n.upper()}={{{{ . | toJSON }}}}{{{{ end }}}}' for n in names) + \
        "\n{{ end }}"
    # json.Number is a string to text/template (so 0 is "true"), false/null/""/{} skip the block, and
    # go-envparse drops the quotes inside an unquoted JSON object or list.
    assert render_env_template(text, fake) == {"ZERO": "0", "TRUE": "true", "FLOAT": "1.5", "OBJ": "{k:v w,n:1}",
                                               "LIST": "[a,1]", "BIG": "12345678901234567000"}


def test_the_index_to_json_form_sets_missing_fields_to_empty():
    fake = FakeVault()
    fake.put("x", {"field": 'a "b"'})
    text = '{{ with secret "secret/data/x" }}A={{ index .Data.data "field" | toJSON }}\n' \
           'M={{ index .Data.data "missing" | toJSON }}\n{{ end }}'
    assert render_env_template(text, fake) == {"A": 'a "b"', "M": ""}


def test_trim_markers_and_literals():
    assert render_template('A \n{{- "{{" -}}\n\t B{{"}}"}}', FakeVault()) == "A{{B}}"
    assert render_template('x{{ "\\x41\\u00e9\\303\\251" }}', FakeVault()) == "xAéé"  # Go string escapes


@pytest.mark.parametrize("text", [
    "{{ .Data.data.password }}", '{{ env "HOME" }}', '{{ key "app/config" }}', "{{/* comment */}}",
    '{{ with secret "secret/x" "k=v" }}{{ end }}', '{{ with secret "a" }}{{ with secret "b" }}{{ end }}{{ end }}',
    '{{ with secret "a" }}{{ . | toJSON }}{{ end }}', '{{ with secret "a" }}{{ .Data.data }}{{ end }}',
    '{{ range $k, $v := .Data.data }}{{ end }}', '{{ with secret "a" }}{{ else }}{{ end }}', "{{ `raw` }}",
    '{{ . | toJSON }}', '{{ with secret "a" }}{{ index .Data.data "f" }}{{ end }}', '{{ "unterminated }}',
    '{{ with secret "secret/x?version=1" }}{{ end }}', "{{ 3 }}", "{{ .Data.data.f | toJSON }}",
    '{{ with secret "secret/x" }}{{ .Data.data.f.g | toJSON }}{{ end }}',
    '{{ with secret "secret/x" }}{{ .Data.f | toJSON }}{{ end }}',
])
def test_forms_outside_our_jobs_are_refused(text):
    fake = FakeVault()
    fake.put("x", {"f": "v"})
    with pytest.raises(UnsupportedTemplate):
        render_template(text, fake)
    assert not [s for s in fake.seen if s.token == "root" and s.method == "GET"]  # refused before reading


@pytest.mark.parametrize("text", ['{{ with secret "a" }}', "{{ end }}", '{{ "\\q" }}', '{{ "\\400" }}'])
def test_malformed_templates_are_errors(text):
    with pytest.raises(TemplateError):
        render_template(text, FakeVault())


# ---------------------------------------------------------------- go-envparse (its README's examples)

def test_env_file_parsing_follows_go_envparse():
    assert parse_env_file("KEY = This is ok! # Parses to {\"KEY\": \"This is ok!\"}\nKEY2= Also ok.    \n"
                          "export FOO=bar    # Parses to {\"FOO\": \"bar\"}\n\n# comment\n") == {
        "KEY": "This is ok!", "KEY2": "Also ok.", "FOO": "bar"}
    line = 'SOME_KEY = normal unquoted \\text \'plus single quoted\\\' "\\"double quoted " # EOL'
    assert parse_env_file(line) == {"SOME_KEY": 'normal unquoted \\text plus single quoted\\ "double quoted '}
    assert parse_env_file('FOO="The template value\\nmay have included\\nsome newlines!\\n\\ud83d\\udd25"') == {
        "FOO": "The template value\nmay have included\nsome newlines!\n\U0001f525"}
    for bad in ("1X=y", "NOEQUALS", 'A="open', "A='open", 'A="\\x"', "A=\x01", "=v", 'A="\\ud83d"'):
        with pytest.raises(EnvFileError, match="error on line 1"):
            parse_env_file(bad)


def test_a_field_printed_as_it_is_must_be_a_string():
    """`{{ . }}` (the service job's API tokens file) prints a string field as it is; other kinds are refused."""
    fake = FakeVault()
    fake.put("app", {"text": "line 1\nline \"2\"", "n": 5, "nested": {"a": "b"}})
    text = '{{ with secret "secret/data/app" }}{{ with index .Data.data "%s" }}{{ . }}{{ end }}{{ end }}'
    assert render_template(text % "text", fake) == 'line 1\nline "2"'
    assert render_template(text % "absent", fake) == ""
    assert render_template(text % "n", fake) == "5"  # a json.Number prints as its text
    with pytest.raises(UnsupportedTemplate):
        render_template(text % "nested", fake)  # Go would print map[a:b]: not modelled
