"""`dispatcher bench --quick --json` as a subprocess: every section is reported with sane,
non-zero values, and the database it created is gone afterwards.

No timing thresholds here: the benchmark's targets are judged on a quiet machine, not in CI.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import asyncpg
import orjson

from dispatcher import bench
from tests import support

SECTIONS = (
    "ceiling",
    "baseline",
    "throughput",
    "shapes",
    "peer",
    "scaling",
    "latency",
    "isolation",
    "backlog",
    "footprint",
    "idle",
)


def _positive(section: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = section[key]
        assert isinstance(value, int | float), (key, value)
        assert value > 0, (key, value)


async def _bench_databases(server_dsn: str) -> list[str]:
    conn = await asyncpg.connect(server_dsn)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'dispatcher_bench_%'"
        )
    finally:
        await conn.close()
    return [r["datname"] for r in rows]


async def test_quick_bench_reports_every_section(server_dsn: str) -> None:
    before = set(await _bench_databases(server_dsn))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DATABASE_URL"] = server_dsn
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "bench",
        "--quick",
        "--json",
        env=env,
        cwd=support.ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 180)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
    progress = stderr.decode(errors="replace")
    report = orjson.loads(stdout)
    for name in SECTIONS:
        assert name in report, name
        assert f"{name} …" in progress, f"no progress line for {name}"

    _positive(report["ceiling"], "rate_per_second", "deliveries")
    _positive(report["baseline"], "rate_per_second", "deliveries")
    for name in ("throughput", "scaling"):
        section = report[name]
        assert section["complete"], section
        _positive(section, "rate_per_second", "deliveries", "cpu_us_per_delivery")
    assert report["scaling"]["processes"] == 2

    latency = report["latency"]
    _positive(latency, "samples", "p50_ms", "p95_ms", "p99_ms")
    assert latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]

    backlog = report["backlog"]
    assert backlog["large"]["pending"] > backlog["small"]["pending"]
    _positive(backlog["small"], "rate_per_second")
    _positive(backlog["large"], "rate_per_second")

    isolation = report["isolation"]
    _positive(isolation["with"], "rate_per_second")
    _positive(isolation["without"], "rate_per_second")
    _positive(isolation, "blackholed_requests")

    for shape in ("a", "c"):
        section = report["shapes"][shape]
        for who in ("naive", "dispatcher"):
            assert section[who]["complete"], (shape, who, section)
            _positive(section[who], "rate_per_second", "cpu_us_per_delivery")
        assert section["dispatcher_vs_naive"] > 0
    assert report["shapes"]["a"]["subscriptions"] == 1
    assert report["shapes"]["c"]["max_in_flight"] == 5

    peer = report["peer"]
    assert peer["complete"], peer
    _positive(peer, "rate_per_second", "cpu_us_per_delivery")

    idle = report["idle"]
    for side in ("alone", "beside"):
        assert idle[side]["complete"], idle
        _positive(idle[side], "rate_per_second", "claim_ms")
    assert idle["beside"]["idle_subscriptions"] > 0 == idle["alone"]["idle_subscriptions"]

    footprint = report["footprint"]
    _positive(footprint, "cpu_us_per_delivery", "rss_mb_peak_with_pending", "deliveries")
    assert footprint["idle_cpu_percent_of_core"] >= 0

    for key in (
        "throughput_vs_baseline",
        "throughput_vs_ceiling",
        "backlog_large_vs_small",
        "isolation",
        "scaling_n_vs_1",
        "shape_a_vs_naive",
        "shape_c_vs_naive",
        "shape_a_vs_peer",
        "idle_throughput",
        "idle_claim_cost",
    ):
        assert report["ratios"][key] > 0, key
    assert {t["target"] for t in report["targets"]} >= {"latency p50 ms", "isolation"}

    # The readable table renders from the same report, with a line per scenario.
    table = bench.render(report)
    for name in ("ceiling", "baseline", "throughput", "shape a", "peer", "latency", "idle"):
        assert name in table

    # The run's own database was dropped.
    assert set(await _bench_databases(server_dsn)) <= before
