"""Scrape cost: what the database gauges and ``/metrics`` cost with a large queue.

Not part of ``make test``. Seeds a fresh database (``DATABASE_URL``'s server, else the embedded
Postgres) with ``--pending`` deliveries spread over ``--subscriptions`` subscriptions
(generate_series, no routing), then measures:

1. the gauge queries' database time (``db_gauges.read``: depth, subscriptions + oldest age,
   backlog) and, for comparison, the exact ``GROUP BY`` count they replace;
2. ``/metrics`` latency from the real admin app, with the registry holding every subscription
   label the limit allows (counters and histograms filled for each);
3. the hot-path price of the counting triggers (sql/004_metrics.sql): claim and ack statement
   times with the triggers enabled and disabled, alternating rounds.

Usage: ``.venv/bin/python -m tests.perf.scrape_cost [--pending 100000] [--subscriptions 1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import prometheus_client as prom
from aiohttp import web

from dispatcher import app, gauges, metrics, model
from dispatcher.db import embedded, repository
from dispatcher.db import gauges as db_gauges
from dispatcher.web import probes
from tests import support

DATABASE = "dispatcher_scrape_cost"
TRIGGERS = ("webhook_delivery_count_insert", "webhook_delivery_count_update")


@contextlib.asynccontextmanager
async def server_dsn() -> AsyncIterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    server = embedded.EmbeddedPostgres(support.ROOT / ".dispatcher" / "perf-pgdata")
    try:
        yield server.start()
    finally:
        server.stop()


async def fresh_database(server: str, name: str = DATABASE) -> str:
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = support.with_database(server, name)
    await app.migrate_database(dsn)
    return dsn


async def seed(pool: Any, pending: int, subscriptions: int) -> float:
    started = time.perf_counter()
    await pool.execute(
        """
        INSERT INTO webhook_subscriptions (url, event_types, secret, max_in_flight, created_at)
        SELECT 'http://127.0.0.1:9/' || g, '{t.x}', 's', 1000, now() - make_interval(secs => g)
        FROM generate_series(1, $1) g
        """,
        subscriptions,
    )
    await pool.execute(
        """
        WITH s AS (
            SELECT id, row_number() OVER (ORDER BY id) - 1 AS n FROM webhook_subscriptions
        ), o AS (
            INSERT INTO webhook_outbox (event_type, payload, routed_at, route_result, created_at)
            SELECT 't.x', '{}', now(), 'routed', now() - make_interval(secs => g % 3600)
            FROM generate_series(1, $1) g
            RETURNING id, created_at
        )
        INSERT INTO webhook_deliveries (outbox_id, subscription_id, event_created_at)
        SELECT o.id, s.id, o.created_at FROM o JOIN s ON s.n = o.id % $2
        """,
        pending,
        subscriptions,
    )
    await pool.execute("VACUUM ANALYZE webhook_deliveries")
    await pool.execute("VACUUM ANALYZE webhook_outbox")
    return time.perf_counter() - started


async def timed(fn: Callable[[], Awaitable[Any]], runs: int) -> list[float]:
    """Milliseconds per run."""
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(ms: list[float]) -> str:
    ordered = sorted(ms)
    p95 = ordered[max(0, round(len(ordered) * 0.95) - 1)]
    return f"median {statistics.median(ms):7.2f} ms  p95 {p95:7.2f} ms  (n={len(ms)})"


async def gauge_cost(pool: Any, runs: int) -> None:
    async with pool.acquire() as conn:
        await db_gauges.compact(conn)
        snapshot = await db_gauges.read(conn)
        active = sorted({s for (s, state), n in snapshot.depth.items() if n > 0})
        ms = await timed(lambda: db_gauges.read(conn), runs)
        print(f"  db_gauges.read (all three statements)      {summary(ms)}")
        for name, sql, args in (
            ("depth (delta sums)", db_gauges._DEPTH_SQL, ()),
            ("subscriptions + oldest age", db_gauges._SUBSCRIPTIONS_SQL, (active,)),
            ("outbox backlog", db_gauges._BACKLOG_SQL, (db_gauges.BACKLOG_EXACT_LIMIT + 1,)),
        ):
            ms = await timed(lambda sql=sql, args=args: conn.fetch(sql, *args), runs)
            print(f"    {name:<36} {summary(ms)}")
        exact = """
            SELECT subscription_id, state, count(*) FROM webhook_deliveries
            WHERE state IN ('pending', 'in_flight', 'retrying', 'dead') GROUP BY 1, 2
        """
        ms = await timed(lambda: conn.fetch(exact), max(3, runs // 5))
        print(f"  for comparison, exact GROUP BY count    {summary(ms)}")


async def scrape_cost(pool: Any, subscriptions: int, max_labels: int, runs: int) -> None:
    registry = prom.CollectorRegistry()
    m = metrics.Metrics(registry, max_subscriptions=max_labels)
    loop = gauges.GaugeLoop(pool, m, interval_seconds=5)
    refresh = await timed(loop.refresh, runs)
    print(f"  GaugeLoop.refresh (read + publish)       {summary(refresh)}")
    gauges.bind_pool(m, pool)
    # Worst case for the exposition: every allowed label has counters and histograms.
    ids = [str(r["id"]) for r in await pool.fetch("SELECT id FROM webhook_subscriptions")]
    for sub in ids[:subscriptions]:
        label = m.label(sub)
        m.attempts.labels(subscription=label, outcome="success").inc()
        m.attempts.labels(subscription=label, outcome="http_5xx").inc()
        m.attempt_duration.labels(subscription=label).observe(0.05)
        m.delivery_latency.labels(subscription=label).observe(0.5)
        m.in_flight.labels(subscription=label).set(0)
    readiness = probes.Readiness(lambda: asyncio.sleep(0))
    runner = web.AppRunner(probes.build_app(readiness, registry), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:

            async def get() -> int:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    return len(await response.read())

            size = await get()
            ms = await timed(get, runs)
        series = sum(
            1 for line in (await _text(port)).splitlines() if line and not line.startswith("#")
        )
        print(
            f"  GET /metrics, {max_labels} labels (+other)   {summary(ms)}"
            f"  {size / 1024:.0f} KiB, {series} samples"
        )
    finally:
        await runner.cleanup()


async def _text(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        return await response.text()


async def hot_path(pool: Any, rounds: int, batch: int, iterations: int) -> None:
    repo = repository.Repository(pool)
    results: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    for round_number in range(rounds * 2):
        enabled = round_number % 2 == 0
        verb = "ENABLE" if enabled else "DISABLE"
        for trigger in TRIGGERS:
            await pool.execute(f"ALTER TABLE webhook_deliveries {verb} TRIGGER {trigger}")
        claims, acks = results[enabled]
        for _ in range(iterations):
            started = time.perf_counter()
            jobs = await repo.claim("perf", batch, 60)
            claims.append((time.perf_counter() - started) * 1000)
            now = time.time()
            delivered = model.DeliveryState.DELIVERED
            batch_acks = [
                model.Ack(j.delivery_id, j.lease_token, j.attempt, delivered, None, 200, None, now,
                          1.0, "success", None)
                for j in jobs
            ]  # fmt: skip
            started = time.perf_counter()
            await repo.ack(batch_acks, "perf")
            acks.append((time.perf_counter() - started) * 1000)
    for trigger in TRIGGERS:
        await pool.execute(f"ALTER TABLE webhook_deliveries ENABLE TRIGGER {trigger}")
    for enabled in (False, True):
        claims, acks = results[enabled]
        label = "with triggers   " if enabled else "without triggers"
        print(f"  batch {batch:>3} {label} claim {summary(claims)}")
        print(f"  batch {batch:>3} {label} ack   {summary(acks)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--subscriptions", type=int, default=1_000)
    parser.add_argument("--max-labels", type=int, default=100)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    async with server_dsn() as server:
        dsn = await fresh_database(server)
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
        try:
            took = await seed(pool, args.pending, args.subscriptions)
            print(
                f"seeded {args.pending} pending deliveries over {args.subscriptions} "
                f"subscriptions in {took:.1f} s"
            )
            print("gauge queries:")
            await gauge_cost(pool, args.runs)
            print("scrape:")
            for labels in sorted({args.max_labels, args.subscriptions}):
                await scrape_cost(pool, args.subscriptions, labels, args.runs)
            print("hot path (claim + ack statements):")
            for batch, iterations in ((1, 200), (100, 20)):
                await hot_path(pool, rounds=3, batch=batch, iterations=iterations)
        finally:
            await pool.close()
            conn = await asyncpg.connect(server)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            finally:
                await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
