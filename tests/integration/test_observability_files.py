"""Checks for the observability files: Grafana dashboards, Prometheus config and alert rules.

The dashboards must match what ``grafana/generate.py`` builds and only query metrics the
dispatcher exports (metric names and labels are a contract); the Prometheus files must pass
``promtool``, and every alert must be documented and unit-tested both firing and silent. No
network, no Prometheus server: ``promtool`` is the only subprocess, and without it these
tests skip locally but fail in CI (``CI=true``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "grafana" / "generate.py"
DASHBOARDS = {
    "dispatcher-overview": ROOT / "grafana" / "dashboards" / "overview.json",
    "dispatcher-subscription": ROOT / "grafana" / "dashboards" / "subscription.json",
}
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RUNBOOK_PREFIX = "https://github.com/dispatcher-dev/dispatcher/blob/main/docs/runbook.md#"
SEVERITIES = {"critical", "warning", "info"}

# Metrics with a `subscription` label: on the drill-down every selector of these must filter.
SUBSCRIPTION_METRICS = {
    "dispatcher_attempts_total",
    "dispatcher_attempt_duration_seconds",
    "dispatcher_delivery_latency_seconds",
    "dispatcher_deliveries_total",
    "dispatcher_queue_depth",
    "dispatcher_oldest_pending_age_seconds",
    "dispatcher_in_flight",
    "dispatcher_subscription_up",
    "dispatcher_subscription_paused",
    "dispatcher_subscription_info",
    "dispatcher_retries_scheduled_total",
}
HISTOGRAMS = {"dispatcher_attempt_duration_seconds", "dispatcher_delivery_latency_seconds"}
KNOWN_METRICS = (
    (SUBSCRIPTION_METRICS - HISTOGRAMS)
    | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {
        "up",
        "dispatcher_outbox_backlog",
        "dispatcher_leases_reclaimed_total",
        "dispatcher_stale_acks_total",
        "dispatcher_claim_failing_seconds",
        "dispatcher_subscriptions_disabled_total",
        "dispatcher_ssrf_blocked_total",
        "dispatcher_events_routed_total",
        "dispatcher_build_info",
    }
)
_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "Inf", "NaN"}


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dispatcher_grafana_generate", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _dashboard(uid: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARDS[uid].read_text(encoding="utf-8"))
    return loaded


def _targets(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [target for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions or keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return {
        match.group()
        for match in re.finditer(r"[A-Za-z_:][\w:]*", expr)
        if not expr[match.end() :].lstrip().startswith("(") and match.group() not in _PROMQL_WORDS
    }


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        reason = "promtool not installed (Debian package `prometheus`; see .ci/tools.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return subprocess.run(
        [promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _alert_rules() -> list[dict[str, Any]]:
    groups = _yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_committed_dashboards_match_the_generator() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_panel_queries_fill_in_every_template_variable() -> None:
    queries = _load_generator().panel_queries(subscription="sub-a", rate_interval="1m")
    committed = [(uid, _targets(_dashboard(uid))) for uid in DASHBOARDS]
    assert len(queries) == sum(len(targets) for _, targets in committed)
    assert {uid for uid, _, _ in queries} == set(DASHBOARDS)
    for uid, title, expr in queries:
        assert "$" not in expr, (uid, title, expr)
    drill_down = [expr for uid, _, expr in queries if uid == "dispatcher-subscription"]
    assert any('subscription=~"sub-a"' in expr for expr in drill_down)
    assert all("[1m]" in expr for _, _, expr in queries if "rate(" in expr)


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard_structure(uid: str) -> None:
    dashboard = _dashboard(uid)
    assert dashboard["uid"] == uid
    assert dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    assert panels
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [panel["title"] for panel in panels]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("h", "w", "x", "y")), panel["title"]
        assert grid["h"] > 0
        assert grid["w"] > 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids, panel["title"]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"]


def test_both_dashboards_show_the_same_panels() -> None:
    overview, drill_down = (_dashboard(uid) for uid in sorted(DASHBOARDS))
    assert [p["title"] for p in overview["panels"]] == [p["title"] for p in drill_down["panels"]]


def test_metric_names_are_extracted_from_promql() -> None:
    expr = 'sum by (le) (rate(a_bucket{x="y{z}"}[5m])) / on (s) b or vector(0) and bool c'
    assert _metric_names(expr) == {"a_bucket", "b", "c"}


def test_queries_use_only_exported_metrics() -> None:
    exprs = [target["expr"] for uid in DASHBOARDS for target in _targets(_dashboard(uid))]
    exprs += [rule["expr"] for rule in _alert_rules()]
    for expr in exprs:
        names = _metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= KNOWN_METRICS, f"unknown metrics {names - KNOWN_METRICS} in {expr!r}"


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_template_variables(uid: str) -> None:
    dashboard = _dashboard(uid)
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert len(variables) == len(dashboard["templating"]["list"]), "variable names must be unique"
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert variable["definition"], variable["name"]
    used = {
        name
        for target in _targets(dashboard)
        for name in re.findall(r"\$\{?(\w+)", target["expr"])
        if not name.startswith("__")
    }
    assert used <= set(variables), f"undefined variables {used - set(variables)}"


def test_subscription_dashboard_filters_every_selector() -> None:
    dashboard = _dashboard("dispatcher-subscription")
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "subscription")
    query = "label_values(dispatcher_subscription_up, subscription)"
    assert variable["type"] == "query"
    assert query in (variable["definition"], variable["query"]["query"])
    filtered = 0
    for target in _targets(dashboard):
        for match in re.finditer(r"\b(dispatcher_\w+)(\{[^}]*\})?", target["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", match.group(1))
            if base in SUBSCRIPTION_METRICS:
                assert 'subscription=~"$subscription"' in (match.group(2) or ""), target["expr"]
                filtered += 1
    assert filtered
    overview = json.dumps(_dashboard("dispatcher-overview")["panels"])
    assert "$subscription" not in overview


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "deploy/prometheus/prometheus.yml"),
        ("check", "rules", "deploy/prometheus/alerts.yml"),
        ("test", "rules", "deploy/prometheus/alerts_test.yml"),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args: tuple[str, ...]) -> None:
    result = _promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_scrapes_the_dispatcher() -> None:
    config = _yaml(PROMETHEUS_DIR / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    assert config["global"]["scrape_interval"] == "15s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["dispatcher"]["static_configs"][0]["targets"] == ["dispatcher:8090"]


def test_every_alert_is_documented() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert {
        "DispatcherDown",
        "DispatcherOutboxBacklogGrowing",
        "DispatcherOldestPendingAgeHigh",
        "DispatcherSubscriptionFailureRatioHigh",
        "DispatcherDeadLettersIncreasing",
        "DispatcherSubscriptionDisabled",
    } <= set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert annotations["description"].strip(), rule["alert"]
        assert annotations["runbook_url"].startswith(RUNBOOK_PREFIX), rule["alert"]


def test_every_alert_is_tested_firing_and_silent() -> None:
    suite = _yaml(PROMETHEUS_DIR / "alerts_test.yml")
    assert suite["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in suite["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert alerts - firing == set(), "alerts without a firing test"
    assert alerts - silent == set(), "alerts without a silent test"
    assert (firing | silent) - alerts == set(), "tests for alerts that do not exist"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    provisioning = ROOT / "grafana" / "provisioning"
    datasources = _yaml(provisioning / "datasources" / "prometheus.yaml")
    (datasource,) = datasources["datasources"]
    assert (datasource["type"], datasource["uid"]) == ("prometheus", "prometheus")
    assert datasource["url"] == "http://prometheus:9090"
    providers = _yaml(provisioning / "dashboards" / "dispatcher.yaml")
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
