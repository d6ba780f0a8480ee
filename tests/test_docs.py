"""Docs that are derived from code stay derived."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jobforge.metrics import WINDOWS, FleetSnapshot, Metrics
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


# ---------------------------------------------------------------- the Grafana dashboard and the store-derived gauges

def _store_gauges() -> set[str]:
    """The families `Metrics.fleet` sets: computed from the store at each scrape, so every replica reports the
    same value and a sum over replicas would count each job once per replica."""
    metrics = Metrics()
    values = lambda: {f.name: [s.value for s in f.samples] for f in metrics.registry.collect()}  # noqa: E731
    before = values()
    metrics.fleet(FleetSnapshot(running=1, queued=1, success_rate=dict.fromkeys(WINDOWS, 1.0)))
    return {name for name, samples in values().items() if samples != before[name]}


def _around(expr: str, name: str) -> list[str]:
    """For each use of metric `name` in a PromQL expression: the aggregation or function whose parentheses
    directly hold it ('' at the top level), skipping a `by (...)`/`without (...)` clause before them."""
    found = []
    for use in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])", expr):
        depth, i = 0, use.start()
        while i > 0:
            i -= 1
            if expr[i] == ")":
                depth += 1
            elif expr[i] == "(":
                if depth == 0:
                    break
                depth -= 1
        else:
            found.append("")
            continue
        head = re.sub(r"\b(by|without)\s*\([^()]*\)\s*$", "", expr[:i].rstrip()).rstrip()
        found.append(re.search(r"(\w*)$", head).group(1))
    return found


def test_the_dashboard_takes_the_max_of_the_gauges_every_replica_reports_alike():
    gauges = _store_gauges()
    assert gauges == {"concurrent_jobs", "queued_jobs", "job_success_rate"}
    bullet = next(b for b in (DOCS / "metrics.md").read_text().split("\n- ") if "computed **from the store**" in b)
    assert set(re.findall(r"`(\w+)`", bullet.split("are computed", 1)[0])) == gauges  # and the doc says max
    uses = []
    for panel in json.loads((DOCS / "grafana" / "jobforge.json").read_text())["panels"]:
        for target in panel["targets"]:
            uses += [(panel["title"], name, around) for name in gauges for around in _around(target["expr"], name)]
    assert {name for _, name, _ in uses} == gauges  # each is on the dashboard
    assert [use for use in uses if use[2] not in ("max", "min")] == []


def test_the_aggregation_around_a_metric_is_found():
    assert _around("sum(concurrent_jobs)", "concurrent_jobs") == ["sum"]
    assert _around('max by (window) (job_success_rate{window="24h"})', "job_success_rate") == ["max"]
    assert _around("sum without (instance) (queued_jobs) + max(queued_jobs)", "queued_jobs") == ["sum", "max"]
    assert _around("concurrent_jobs_total + sum(rate(x[5m]))", "concurrent_jobs") == []
    assert _around("concurrent_jobs", "concurrent_jobs") == [""]
