"""The bench report: ratios between scenarios of one run, the targets they are judged
against, and the readable table.

Pure functions of the report dictionary; nothing is measured here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dispatcher.bench import measure

TARGETS: tuple[tuple[str, str, float, Callable[[dict[str, Any]], float | None]], ...] = (
    ("throughput / baseline", ">=", 1.0, lambda r: r["ratios"].get("throughput_vs_baseline")),
    ("shape a / naive", ">=", 1.0, lambda r: r["ratios"].get("shape_a_vs_naive")),
    ("shape c / naive", ">=", 1.0, lambda r: r["ratios"].get("shape_c_vs_naive")),
    ("shape a / pgqueuer peer", ">=", 1.5, lambda r: r["ratios"].get("shape_a_vs_peer")),
    ("CPU µs/delivery (b)", "<=", 250.0, lambda r: _get(r, "throughput", "cpu_us_per_delivery")),
    ("CPU µs/delivery (a)", "<=", 250.0, lambda r: _shape(r, "a", "cpu_us_per_delivery")),
    ("CPU µs/delivery (c)", "<=", 250.0, lambda r: _shape(r, "c", "cpu_us_per_delivery")),
    (
        "DB CPU µs/delivery (b)",
        "<=",
        90.0,
        lambda r: _get(r, "throughput", "db_cpu_us_per_delivery"),
    ),
    ("DB CPU µs/delivery (a)", "<=", 90.0, lambda r: _shape(r, "a", "db_cpu_us_per_delivery")),
    ("DB CPU µs/delivery (c)", "<=", 90.0, lambda r: _shape(r, "c", "db_cpu_us_per_delivery")),
    ("idle subscriptions tput", ">=", 0.9, lambda r: _get(r, "idle", "throughput_ratio")),
    ("idle subscriptions claim", "<=", 1.2, lambda r: _get(r, "idle", "claim_cost_ratio")),
    ("throughput / ceiling", ">=", 0.6, lambda r: r["ratios"].get("throughput_vs_ceiling")),
    ("latency p50 ms", "<=", 5.0, lambda r: _get(r, "latency", "p50_ms")),
    ("latency p99 ms", "<=", 25.0, lambda r: _get(r, "latency", "p99_ms")),
    ("backlog large / small", ">=", 0.8, lambda r: r["ratios"].get("backlog_large_vs_small")),
    ("isolation", ">=", 0.9, lambda r: r["ratios"].get("isolation")),
    ("idle CPU % of a core", "<=", 1.0, lambda r: _get(r, "footprint", "idle_cpu_percent_of_core")),
    (
        "RSS MB with pending",
        "<=",
        150.0,
        lambda r: _get(r, "footprint", "rss_mb_peak_with_pending"),
    ),
    ("CPU µs per delivery", "<=", 300.0, lambda r: _get(r, "footprint", "cpu_us_per_delivery")),
)


def _shape(report: dict[str, Any], shape: str, key: str) -> float | None:
    value = report.get("shapes", {}).get(shape, {}).get("dispatcher", {}).get(key)
    return None if value is None else float(value)


def _get(report: dict[str, Any], section: str, key: str) -> float | None:
    value = report.get(section, {}).get(key)
    return None if value is None else float(value)


def ratios(report: dict[str, Any]) -> dict[str, float | None]:
    def rate(*path: str) -> float | None:
        node: Any = report
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return None if node is None else float(node)

    tp = rate("throughput", "rate_per_second")
    out = {
        "throughput_vs_baseline": measure.ratio(tp, rate("baseline", "rate_per_second")),
        "throughput_vs_ceiling": measure.ratio(tp, rate("ceiling", "rate_per_second")),
        "backlog_large_vs_small": measure.ratio(
            rate("backlog", "large", "rate_per_second"), rate("backlog", "small", "rate_per_second")
        ),
        "isolation": measure.ratio(
            rate("isolation", "with", "rate_per_second"),
            rate("isolation", "without", "rate_per_second"),
        ),
        "scaling_n_vs_1": measure.ratio(rate("scaling", "rate_per_second"), tp),
        "shape_a_vs_naive": rate("shapes", "a", "dispatcher_vs_naive"),
        "shape_c_vs_naive": rate("shapes", "c", "dispatcher_vs_naive"),
        "shape_a_vs_peer": measure.ratio(
            rate("shapes", "a", "dispatcher", "rate_per_second"), rate("peer", "rate_per_second")
        ),
        "idle_throughput": rate("idle", "throughput_ratio"),
        "idle_claim_cost": rate("idle", "claim_cost_ratio"),
    }
    return {k: v for k, v in out.items() if v is not None}


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, op, bound, get in TARGETS:
        value = get(report)
        if value is None:
            continue
        met = value >= bound if op == ">=" else value <= bound
        out.append({"target": name, "bound": f"{op} {bound:g}", "value": value, "met": met})
    return out


def render(report: dict[str, Any]) -> str:
    lines = [
        f"dispatcher bench {report['version']} — {report['machine']['cpus']} CPUs, "
        f"Postgres {report['machine']['postgres']}, receiver: {report['machine']['receiver']}",
        "",
        f"{'scenario':<12} result",
    ]

    def add(name: str, text: str) -> None:
        lines.append(f"{name:<12} {text}")

    r = report
    if "ceiling" in r:
        c = r["ceiling"]
        add(
            "ceiling",
            f"{c['rate_per_second']:>9,.0f} req/s   raw aiohttp POSTs, {c['concurrency']} "
            f"concurrent, {c['deliveries']:,} requests, "
            f"{c['client_cpu_us_per_request']} µs client CPU/request",
        )
    if "baseline" in r:
        b = r["baseline"]
        add(
            "baseline",
            f"{b['rate_per_second']:>9,.0f} /s      naive claim {b['batch']} → sign → gather → "
            f"mark done, {b['deliveries']:,} deliveries",
        )
    if "throughput" in r:
        t = r["throughput"]
        add(
            "throughput",
            f"{t['rate_per_second']:>9,.0f} /s      dispatcher, 1 process, {t['deliveries']:,} "
            f"deliveries over {t['subscriptions']} subscriptions, "
            f"{t['cpu_us_per_delivery']} µs CPU/delivery",
        )
    if "shapes" in r:
        for name, x in r["shapes"].items():
            d, n = x["dispatcher"], x["naive"]
            add(
                f"shape {name}",
                f"{d['rate_per_second']:>9,.0f} /s      {x['subscriptions']} subscription(s) x "
                f"max_in_flight {x['max_in_flight']}: naive {n['rate_per_second']:,.0f} /s "
                f"({x['dispatcher_vs_naive']}x), {d['cpu_us_per_delivery']} µs CPU, "
                f"{d['db_cpu_us_per_delivery']} µs DB CPU per delivery",
            )
    if "peer" in r:
        p = r["peer"]
        if "skipped" in p:
            add("peer", f"skipped: {p['skipped']}")
        else:
            add(
                "peer",
                f"{p['rate_per_second']:>9,.0f} /s      pgqueuer {p['pgqueuer']} + aiohttp, shape "
                f"{p['shape']}, {p['cpu_us_per_delivery']} µs CPU/delivery",
            )
    if "scaling" in r:
        s = r["scaling"]
        add(
            "scaling",
            f"{s['rate_per_second']:>9,.0f} /s      dispatcher, {s['processes']} processes, "
            f"{s['cpu_us_per_delivery']} µs CPU/delivery",
        )
    if "latency" in r:
        lat = r["latency"]
        add(
            "latency",
            f"p50 {lat['p50_ms']} ms · p95 {lat['p95_ms']} ms · p99 {lat['p99_ms']} ms at "
            f"{lat['offered_per_second']:.0f} events/s ({lat['samples']} samples)",
        )
    if "backlog" in r:
        bl = r["backlog"]
        for key in ("small", "large"):
            x = bl[key]
            add(
                f"backlog {key}",
                f"{x['rate_per_second']:>9,.0f} /s      with {x['pending']:,} pending "
                f"(first {bl['window']:,} drained; seeded in {x['seed_seconds']} s)",
            )
    if "isolation" in r:
        iso = r["isolation"]
        add(
            "isolation",
            f"{iso['without']['rate_per_second']:,.0f} /s healthy alone → "
            f"{iso['with']['rate_per_second']:,.0f} /s beside a blackholed subscription "
            f"({iso['blackholed_requests']} requests held to the "
            f"{iso['request_timeout_seconds']} s timeout)",
        )
    if "footprint" in r:
        f = r["footprint"]
        add(
            "footprint",
            f"idle {f['idle_cpu_percent_of_core']} % of a core · peak RSS "
            f"{f['rss_mb_peak_with_pending']} MB with {f['pending']:,} pending · "
            f"{f['cpu_us_per_delivery']} µs CPU/delivery",
        )
    if "idle" in r:
        i = r["idle"]
        add(
            "idle",
            f"{i['alone']['rate_per_second']:,.0f} /s alone → {i['beside']['rate_per_second']:,.0f}"
            f" /s beside {i['beside']['idle_subscriptions']:,} idle subscriptions; "
            f"{i['claim_rows']}-row claim {i['alone']['claim_ms']} → {i['beside']['claim_ms']} ms",
        )
    lines += ["", "ratios (compare these across machines)"]
    for key, value in r["ratios"].items():
        lines.append(f"  {key:<26} {value:.3f}")
    lines += ["", "targets"]
    for t in r["targets"]:
        lines.append(
            f"  {t['target']:<26} {t['value']:>10.3f}  {t['bound']:<8} "
            f"{'met' if t['met'] else 'MISSED'}"
        )
    return "\n".join(lines)


def summary(section: dict[str, Any]) -> str:
    keys = (
        "rate_per_second",
        "p50_ms",
        "p99_ms",
        "cpu_us_per_delivery",
        "idle_cpu_percent_of_core",
    )
    parts = [f"{k}={section[k]}" for k in keys if k in section]
    for sub in ("small", "large", "without", "with", "alone", "beside"):
        if sub in section:
            parts.append(f"{sub}={section[sub]['rate_per_second']}/s")
    for shape in ("a", "c"):
        if shape in section:
            parts.append(f"{shape}={section[shape]['dispatcher_vs_naive']}x naive")
    for key in ("throughput_ratio", "claim_cost_ratio"):
        if key in section:
            parts.append(f"{key}={section[key]}")
    return ", ".join(parts)
