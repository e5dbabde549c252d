"""deploy/grafana and deploy/prometheus: structure, PromQL, and agreement with what tidegate exports.

Every PromQL expression (panel targets, annotations, variable queries, alert
rules) is parsed; every ``tidegate_*`` series it names must be exported by
``proxy.metrics.Metrics()``; label values it pins must be values tidegate
produces.  With promtool installed (Debian's ``prometheus`` package), the
rules also pass ``promtool check rules`` and the unit tests in
``promtool/alerts_test.yaml``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
import unicodedata
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from migrator.state import Phase

from .conftest import (
    ALERTS,
    BASE,
    DASHBOARD,
    OPERATIONS,
    SCHEMAS,
    exported_metrics,
    exported_series_names,
    grafana_variables,
    load_documents,
    reported_name,
    selectors,
    tool,
)

#: Label values tidegate produces, where the set is closed.
KNOWN_LABEL_VALUES = {
    ("tidegate_queries_total", "result"): {"ok", "error"},
    ("tidegate_bytes_total", "direction"): {"client_to_backend", "backend_to_client"},
    ("tidegate_protocol_errors_total", "side"): {"client", "backend"},
    ("tidegate_gate_holds_total", "result"): {"released", "expired", "abandoned"},
    ("tidegate_cutover_attempts_total", "result"): {"success", "drain_timeout", "lock_timeout", "error"},
    ("tidegate_migration_state", "state"): {phase.value for phase in Phase},
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def rule() -> dict[str, Any]:
    (document,) = load_documents(ALERTS)
    return document


def alerts(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [alert for group in rule["spec"]["groups"] for alert in group["rules"]]


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # panels inside collapsed rows
    return found


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every query in the dashboard."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            found.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: expected label_values(selector, label)"
            found.append((f"variable {variable['name']}", match.group(1)))
    return found


def alert_expressions(rule: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"alert {alert['alert']}", alert["expr"]) for alert in alerts(rule)]


# ---------------------------------------------------------------- the dashboard

def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    jsonschema.validate(dashboard, json.loads((SCHEMAS / "grafana-dashboard.json").read_text()))
    assert dashboard["uid"] == "tidegate"
    assert len(DASHBOARD.read_bytes()) < 200_000, "kubectl apply keeps a copy in an annotation (256 KiB max)"


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    taken: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[x, y]!r}"
                taken[x, y] = panel["title"]


def test_queries_use_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
        assert panel.get("description"), f"{panel['title']!r} needs a description (shown as a tooltip)"


def test_variables_are_defined(dashboard: dict[str, Any]) -> None:
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    for where, expr in dashboard_expressions(dashboard):
        assert grafana_variables(expr) <= defined, f"{where}: {grafana_variables(expr) - defined}"
    assert {"datasource", "job", "namespace", "instance", "migration"} <= defined


def test_dashboard_limits_match_the_sidecar_config(dashboard: dict[str, Any]) -> None:
    limits = tomllib.loads((BASE / "tidegate.toml").read_text())["limits"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("max_client_connections", "max_backend_connections"):
        assert int(variables[name]["query"]) == limits[name], name


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_promql_parses(source: str, dashboard: dict[str, Any], rule: dict[str, Any]) -> None:
    expressions = dashboard_expressions(dashboard) if source == "dashboard" else alert_expressions(rule)
    assert expressions
    for where, expr in expressions:
        try:
            list(selectors(expr))
        except Exception as error:  # promql_parser raises ValueError-like errors
            pytest.fail(f"{where}: {error}\n{expr}")


# ---------------------------------------------------------------- metric names

def referenced(dashboard: dict[str, Any], rule: dict[str, Any]) -> dict[str, list[str]]:
    """tidegate_* series name → where it is used."""
    found: dict[str, list[str]] = {}
    for where, expr in dashboard_expressions(dashboard) + alert_expressions(rule):
        for name, _ in selectors(expr):
            if name.startswith("tidegate_"):
                found.setdefault(name, []).append(where)
    return found


def test_every_named_metric_is_exported(dashboard: dict[str, Any], rule: dict[str, Any]) -> None:
    exported = exported_series_names()
    missing: dict[str, list[str]] = {}
    for name, places in sorted(referenced(dashboard, rule).items()):
        if name not in exported:
            missing.setdefault(reported_name(name), []).extend(places)
    assert not missing, "named but not exported by proxy.metrics.Metrics():\n" + "\n".join(
        f"  {name}: {', '.join(sorted(set(places)))}" for name, places in sorted(missing.items())
    )


def test_every_exported_family_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    """The dashboard shows everything tidegate exports (the *_created and start-time helpers aside)."""
    shown = {reported_name(name) for name in referenced(dashboard, {"spec": {"groups": []}})}
    families = {
        name.removesuffix("_total") if kind == "counter" and name.endswith("_total") else name
        for name, kind in exported_metrics().items()
        if name.startswith("tidegate_") and not name.endswith("_created")
    }
    shown_families = {name.removesuffix("_total") for name in shown}
    assert not families - shown_families, sorted(families - shown_families)


def test_label_values_are_ones_tidegate_produces(dashboard: dict[str, Any], rule: dict[str, Any]) -> None:
    for where, expr in dashboard_expressions(dashboard) + alert_expressions(rule):
        for name, labels in selectors(expr):
            for label, value in labels.items():
                known = KNOWN_LABEL_VALUES.get((name, label))
                if known is None or "$" in value:
                    continue
                # = and =~ matchers alike: every alternative must be a known value
                for alternative in value.split("|"):
                    assert alternative in known, f"{where}: {name}{{{label}={alternative!r}}} is never exported"


# ---------------------------------------------------------------- the alerts

def test_alert_rule_structure(rule: dict[str, Any]) -> None:
    jsonschema.validate(rule, json.loads((SCHEMAS / "prometheusrule.json").read_text()))
    names = [alert["alert"] for alert in alerts(rule)]
    assert len(names) == len(set(names))
    for alert in alerts(rule):
        assert 'job="tidegate"' in alert["expr"], f"{alert['alert']} must select job=tidegate"


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = unicodedata.normalize("NFKC", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def operations_anchors() -> set[str]:
    anchors = set()
    in_code = False
    for line in OPERATIONS.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchors.add(github_anchor(match.group(1)))
    return anchors


def test_every_alert_has_a_runbook_entry(rule: dict[str, Any]) -> None:
    anchors = operations_anchors()
    for alert in alerts(rule):
        url = alert["annotations"]["runbook_url"]
        anchor = url.rsplit("#", 1)[1]
        assert anchor == github_anchor(alert["alert"]), url
        assert anchor in anchors, f"docs/operations.md has no heading for {alert['alert']}"


def test_anchor_rules() -> None:
    assert github_anchor("TidegateDown") == "tidegatedown"
    assert github_anchor("Reading the dashboard") == "reading-the-dashboard"
    assert github_anchor("Shutdown budget (SIGTERM)") == "shutdown-budget-sigterm"


def _promtool() -> str:
    binary = tool("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return binary


def test_promtool_check_rules(rule: dict[str, Any], tmp_path: Path) -> None:
    binary = _promtool()
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run([binary, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests(rule: dict[str, Any], tmp_path: Path) -> None:
    """Each alert fires on the series it is meant for, and stays quiet otherwise."""
    binary = _promtool()
    spec = json.loads(json.dumps(rule["spec"]))
    for group in spec["groups"]:
        for alert in group["rules"]:
            alert.pop("annotations")  # checked by check rules; promtool would compare their text
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    tests = Path(__file__).parent / "promtool" / "alerts_test.yaml"
    shutil.copy(tests, tmp_path / tests.name)
    result = subprocess.run(
        [binary, "test", "rules", tests.name], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", tests.read_text()))
    assert tested == {alert["alert"] for alert in alerts(rule)} - UNTESTED_ALERTS


#: Alerts whose expressions are simple enough that promtool's check suffices.
UNTESTED_ALERTS = frozenset({
    "TidegateQueryLatencyHigh",
    "TidegateBackendQueueBacklog",
    "TidegateBackendConnectErrors",
    "TidegateAuthFailuresHigh",
    "TidegateBackendProtocolErrors",
})
