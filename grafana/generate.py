"""Generate the Grafana dashboards in ``grafana/dashboards/`` from one compact panel list.

The overview and the per-subscription drill-down share the same panels; the drill-down only
adds a ``subscription`` matcher to every selector that carries that label. The JSON files are
committed so Grafana can provision them without Python; ``--check`` (run by the unit tests)
fails when they drift from this file. ``panel_queries()`` hands every panel query, with the
template variables filled in, to tests that evaluate them against a real Prometheus.

Stdlib only, and no I/O outside ``main()``: importing this module must stay side-effect free.

Usage: ``python grafana/generate.py`` rewrites the JSON; ``--check`` exits 1 on drift.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
SCHEMA_VERSION = 39
GRID_WIDTH = 24
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# `{SUB}` marks where a selector takes the subscription matcher: it vanishes on the overview
# and becomes `subscription=~"$subscription"` on the drill-down (see `_scope`). Selectors of
# label-less metrics (the outbox backlog) simply do not carry it.
SUB_MATCHER = 'subscription=~"$subscription"'
RATE = "[$__rate_interval]"

# Queue gauges are read from the shared database, so every replica reports the same value;
# `max by` de-duplicates them before summing across subscriptions.
QUEUE_DEPTH = "max by (subscription, state) (dispatcher_queue_depth{SUB})"
DEAD_LETTERS = 'max by (subscription) (dispatcher_queue_depth{SUB,state="dead"})'


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    # Ask Prometheus for the series' exemplars too (the dispatcher attaches trace ids to the
    # delivery-latency histogram), so a point links to its trace.
    exemplar: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # "stat" or "timeseries"
    targets: tuple[Target, ...]
    unit: str = "short"
    description: str = ""
    # Stat thresholds as ascending (value, colour) steps above `thresholds_base`.
    thresholds: tuple[tuple[float, str], ...] = ()
    # Stats whose good direction is "high" (success ratio) use red as their base instead.
    thresholds_base: str = "green"
    width: int = 12
    height: int = 8


def _quantiles(metric: str, *, exemplar: bool = False) -> tuple[Target, ...]:
    bucket_rate = f"sum by (le) (rate({metric}_bucket{{SUB}}{RATE}))"
    return tuple(
        Target(f"histogram_quantile({q}, {bucket_rate})", f"p{round(q * 100)}", exemplar)
        for q in (0.5, 0.95, 0.99)
    )


def _stat(title: str, *targets: Target, **options: Any) -> Panel:
    return Panel(title, "stat", targets, width=4, height=4, **options)


def _series(title: str, *targets: Target, **options: Any) -> Panel:
    return Panel(title, "timeseries", targets, **options)


# Successes, with a 0 for every attempt series of another outcome: a subscription that never
# succeeded then shows 0 % instead of vanishing (its success series does not exist).
SUCCESSES = (
    f'rate(dispatcher_attempts_total{{SUB,outcome="success"}}{RATE})'
    f" or 0 * rate(dispatcher_attempts_total{{SUB}}{RATE})"
)
SUCCESS_RATIO = f"sum({SUCCESSES}) / sum(rate(dispatcher_attempts_total{{SUB}}{RATE}))"
# Legends name a subscription by its URL's host and description (dispatcher_subscription_info)
# with the id after them; a series without info (the folded "other") keeps its id alone.
NAMED_LEGEND = "{{host}} {{description}} {{subscription}}"


def _named(expr: str) -> str:
    """``expr`` (one series per subscription) joined with the subscription's info labels."""
    info = "max by (subscription, host, description) (dispatcher_subscription_info{SUB})"
    joined = f"({expr}) * on (subscription) group_left (host, description) {info}"
    return f"{joined} or on (subscription) ({expr})"


PANELS: tuple[Panel, ...] = (
    # A row of headline numbers, then time series in pairs.
    _stat(
        "Success ratio",
        Target(SUCCESS_RATIO),
        unit="percentunit",
        description="Share of HTTP attempts answered with a 2xx.",
        thresholds=((0.9, "orange"), (0.99, "green")),
        thresholds_base="red",
    ),
    _stat(
        "In flight",
        Target("sum(dispatcher_in_flight{SUB})"),
        description="Requests on the wire now.",
    ),
    _stat(
        "Oldest pending age",
        Target("max(dispatcher_oldest_pending_age_seconds{SUB})"),
        unit="s",
        description="Age of the oldest undelivered delivery. Alerts above 15 minutes.",
        thresholds=((300, "orange"), (900, "red")),
    ),
    _stat(
        "Outbox backlog",
        Target("max(dispatcher_outbox_backlog)"),
        description="Outbox rows not yet routed, for the whole database (not per subscription).",
        thresholds=((1000, "red"),),
    ),
    _stat(
        "Dead letters",
        Target(f"sum({DEAD_LETTERS})"),
        description="Deliveries in the dead state, waiting for a replay or a purge.",
        thresholds=((1, "red"),),
    ),
    _stat(
        "Subscriptions up / down",
        Target(
            "count(max by (subscription) (dispatcher_subscription_up{SUB}) == 1) or vector(0)", "up"
        ),
        Target(
            "count(max by (subscription) (dispatcher_subscription_up{SUB}) == 0) or vector(0)",
            "down",
        ),
        description="Healthy subscriptions, and those paused or disabled (e.g. after a 410).",
    ),
    _series(
        "Attempts/s by outcome",
        Target(f"sum by (outcome) (rate(dispatcher_attempts_total{{SUB}}{RATE}))", "{{outcome}}"),
        unit="reqps",
        description="Every HTTP attempt, retries included, by classified outcome.",
    ),
    _series(
        "Deliveries/s by result",
        Target(f"sum by (result) (rate(dispatcher_deliveries_total{{SUB}}{RATE}))", "{{result}}"),
        unit="ops",
        description="Finished deliveries: delivered, or dead after exhausting retries.",
    ),
    _series(
        "Attempt latency",
        *_quantiles("dispatcher_attempt_duration_seconds"),
        unit="s",
        description="One HTTP attempt, request start to response read.",
    ),
    _series(
        "End-to-end latency",
        *_quantiles("dispatcher_delivery_latency_seconds", exemplar=True),
        unit="s",
        description=(
            "Outbox insert to first 2xx, retries and queueing included. With tracing on, the "
            "dots are exemplars: each links to the trace of a delivery in that bucket."
        ),
    ),
    _series(
        "Success ratio by subscription",
        Target(
            _named(
                f"sum by (subscription) ({SUCCESSES})"
                f" / sum by (subscription) (rate(dispatcher_attempts_total{{SUB}}{RATE}))"
            ),
            NAMED_LEGEND,
        ),
        unit="percentunit",
        description="Share of attempts answered with a 2xx. Alerts below 50% over 10 minutes.",
    ),
    _series(
        "Queue depth by state",
        Target(f"sum by (state) ({QUEUE_DEPTH})", "{{state}}"),
        description="Deliveries by state: pending, in_flight, retrying, dead.",
    ),
    _series(
        "Oldest pending age by subscription",
        Target(
            _named("max by (subscription) (dispatcher_oldest_pending_age_seconds{SUB})"),
            NAMED_LEGEND,
        ),
        unit="s",
        description="Age of the oldest undelivered delivery per subscription.",
    ),
    _series(
        "In flight by subscription",
        Target(_named("sum by (subscription) (dispatcher_in_flight{SUB})"), NAMED_LEGEND),
        description="Requests on the wire, against each subscription's max-in-flight cap.",
    ),
    _series(
        "Dead letters/s",
        Target(
            _named(
                "sum by (subscription) "
                f'(rate(dispatcher_deliveries_total{{SUB,result="dead"}}{RATE}))'
            ),
            NAMED_LEGEND,
        ),
        unit="ops",
        description="Deliveries dead-lettered per second. Any increase alerts.",
    ),
    _series(
        "Retries scheduled/s",
        Target(
            _named(
                f"sum by (subscription) (rate(dispatcher_retries_scheduled_total{{SUB}}{RATE}))"
            ),
            NAMED_LEGEND,
        ),
        unit="ops",
        description="Failed attempts sent back to wait for their next backoff slot.",
    ),
    _series(
        "Events routed/s by result",
        Target(f"sum by (result) (rate(dispatcher_events_routed_total{RATE}))", "{{result}}"),
        unit="ops",
        description=(
            "Outbox events turned into deliveries, for the whole database (not per subscription)."
            " Unmatched events had no subscription whose filter matched."
        ),
    ),
    _series(
        "Subscription state",
        Target(_named("max by (subscription) (dispatcher_subscription_up{SUB})"), NAMED_LEGEND),
        description="1 healthy, 0 paused or disabled.",
    ),
)


@dataclass(frozen=True)
class Dashboard:
    uid: str
    filename: str
    title: str
    by_subscription: bool
    description: str


DASHBOARDS: tuple[Dashboard, ...] = (
    Dashboard(
        "dispatcher-overview",
        "overview.json",
        "Dispatcher / Overview",
        by_subscription=False,
        description="Webhook delivery across all subscriptions.",
    ),
    Dashboard(
        "dispatcher-subscription",
        "subscription.json",
        "Dispatcher / Subscription",
        by_subscription=True,
        description="The overview's panels for one subscription.",
    ),
)


def _scope(expr: str, by_subscription: bool) -> str:
    if by_subscription:
        return expr.replace("{SUB", "{" + SUB_MATCHER)
    return expr.replace("{SUB}", "").replace("{SUB,", "{")


def _layout(panels: tuple[Panel, ...]) -> list[dict[str, int]]:
    """Flow panels left to right, wrapping onto a new line when the grid is full."""
    positions: list[dict[str, int]] = []
    x = y = line_height = 0
    for panel in panels:
        if x + panel.width > GRID_WIDTH:
            x, y, line_height = 0, y + line_height, 0
        positions.append({"h": panel.height, "w": panel.width, "x": x, "y": y})
        x += panel.width
        line_height = max(line_height, panel.height)
    return positions


def _field_config(panel: Panel) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": panel.thresholds_base, "value": None}]
    steps += [{"color": color, "value": value} for value, color in panel.thresholds]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if panel.kind == "timeseries":
        defaults["color"] = {"mode": "palette-classic"}
        defaults["custom"] = {"fillOpacity": 10, "lineWidth": 1, "showPoints": "never"}
        defaults["min"] = 0
    else:
        defaults["color"] = {"mode": "thresholds"}
    return {"defaults": defaults, "overrides": []}


def _options(panel: Panel) -> dict[str, Any]:
    if panel.kind == "stat":
        return {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        }
    return {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


def _panel_json(
    panel: Panel, panel_id: int, grid_pos: dict[str, int], by_subscription: bool
) -> dict[str, Any]:
    targets = [
        {
            "datasource": DATASOURCE,
            "expr": _scope(target.expr, by_subscription),
            "legendFormat": target.legend or "__auto",
            "range": True,
            "refId": chr(ord("A") + index),
            **({"exemplar": True} if target.exemplar else {}),
        }
        for index, target in enumerate(panel.targets)
    ]
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": grid_pos,
        "fieldConfig": _field_config(panel),
        "options": _options(panel),
        "targets": targets,
    }


def _templating(by_subscription: bool) -> list[dict[str, Any]]:
    variables: list[dict[str, Any]] = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
            "hide": 0,
            "includeAll": False,
            "multi": False,
            "options": [],
            "refresh": 1,
            "regex": "",
        }
    ]
    if by_subscription:
        query = "label_values(dispatcher_subscription_up, subscription)"
        variables.append(
            {
                "name": "subscription",
                "label": "Subscription",
                "type": "query",
                "datasource": DATASOURCE,
                "definition": query,
                "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
                "current": {},
                "hide": 0,
                "includeAll": False,
                "multi": False,
                "options": [],
                "refresh": 2,
                "regex": "",
                "sort": 1,
            }
        )
    return variables


def build(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard JSON model Grafana provisions."""
    panels = [
        _panel_json(panel, index + 1, grid_pos, dashboard.by_subscription)
        for index, (panel, grid_pos) in enumerate(zip(PANELS, _layout(PANELS), strict=True))
    ]
    return {
        "id": None,
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["dispatcher"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "version": 1,
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "title": "Dispatcher dashboards",
                "type": "dashboards",
                "tags": ["dispatcher"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": _templating(dashboard.by_subscription)},
        "panels": panels,
    }


def render(dashboard: Dashboard) -> str:
    return json.dumps(build(dashboard), indent=2, ensure_ascii=False) + "\n"


def panel_queries(
    subscription: str = ".*", rate_interval: str = "1m"
) -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) for every target, template variables filled in.

    ``subscription`` is used inside a regex matcher, so ``.*`` selects every subscription.
    """
    queries: list[tuple[str, str, str]] = []
    for dashboard in DASHBOARDS:
        for panel in build(dashboard)["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$subscription", subscription)
                queries.append(
                    (dashboard.uid, panel["title"], expr.replace("$__rate_interval", rate_interval))
                )
    return queries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed JSON differs; write nothing"
    )
    args = parser.parse_args(argv)
    stale: list[str] = []
    for dashboard in DASHBOARDS:
        path = DASHBOARD_DIR / dashboard.filename
        wanted = render(dashboard)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == wanted:
            continue
        if args.check:
            stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(wanted, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(
            "stale dashboards (run `python grafana/generate.py`): " + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
