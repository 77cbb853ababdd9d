"""Console page cost: the server time of each ``/ui/`` page with a large delivery table.

Not part of ``make test``. Seeds a fresh database (``DATABASE_URL``'s server, else the
embedded Postgres) with ``--deliveries`` deliveries over ``--subscriptions`` subscriptions,
one attempt each, spread over the last ``--hours`` hours (90 % delivered, 5 % dead, 3 %
pending, 2 % retrying; generate_series, no routing), then serves the real console app and
requests every page ``--runs`` times after signing in. Reports the ``Server-Timing`` the
console sets (handler and database time, no network) and the client-side wall time.

Usage: ``.venv/bin/python -m tests.perf.console_pages [--deliveries 1000000]``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import re
import time
from typing import Any

import asyncpg
from aiohttp import web

from dispatcher import signing, validation
from dispatcher.db import management
from dispatcher.web.console import pages
from tests.integration.console_support import ConsoleClient
from tests.perf.scrape_cost import fresh_database, server_dsn, summary

TOKEN = "perf-console-token-0123456789"
DATABASE = "dispatcher_console_pages"


async def seed(pool: Any, deliveries: int, subscriptions: int, hours: float) -> float:
    started = time.perf_counter()
    await pool.execute(
        """
        INSERT INTO webhook_subscriptions (url, event_types, secret, description, created_at)
        SELECT 'http://127.0.0.1:9/hook/' || g, '{order.*}', 's', 'endpoint ' || g,
               now() - make_interval(secs => g)
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
            SELECT CASE WHEN g % 7 = 0 THEN 'order.refunded' ELSE 'order.created' END,
                   jsonb_build_object('order', g, 'total', g % 1000),
                   now(), 'routed',
                   now() - make_interval(secs => ($1 - g) * $3 * 3600.0 / $1)
            FROM generate_series(1, $1) g
            RETURNING id, created_at
        )
        INSERT INTO webhook_deliveries (outbox_id, subscription_id, event_created_at, created_at,
                                        state, attempt, last_status, finished_at)
        SELECT o.id, s.id, o.created_at, o.created_at,
               CASE WHEN o.id % 100 < 90 THEN 'delivered' WHEN o.id % 100 < 95 THEN 'dead'
                    WHEN o.id % 100 < 98 THEN 'pending' ELSE 'retrying' END,
               1,
               CASE WHEN o.id % 100 < 90 THEN 200 ELSE 500 END,
               CASE WHEN o.id % 100 < 95 THEN o.created_at END
        FROM o JOIN s ON s.n = o.id % $2
        """,
        deliveries,
        subscriptions,
        hours,
    )
    await pool.execute(
        """
        INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, outcome,
                                      status_code, response_body, worker)
        SELECT id, 1, created_at, 12.5,
               CASE WHEN last_status = 200 THEN 'success' ELSE 'http_5xx' END,
               last_status, 'ok', 'perf'
        FROM webhook_deliveries ORDER BY id
        """
    )
    for table in ("webhook_deliveries", "webhook_outbox", "webhook_attempts"):
        await pool.execute(f"VACUUM ANALYZE {table}")
    return time.perf_counter() - started


async def serve(pool: Any) -> tuple[web.AppRunner, str]:
    root = web.Application()
    root.add_subapp(
        pages.PREFIX,
        pages.build(
            management.Management(pool), token=TOKEN, signers=signing.SignerRegistry.load()
        ),
    )
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def page_list(pool: Any) -> list[tuple[str, str]]:
    sub = await pool.fetchval("SELECT id FROM webhook_subscriptions ORDER BY created_at LIMIT 1")
    middle = await pool.fetchval("SELECT max(id) / 2 FROM webhook_deliveries")
    dead = await pool.fetchval(
        "SELECT id FROM webhook_deliveries WHERE state = 'dead' ORDER BY id DESC LIMIT 1"
    )
    event = await pool.fetchval("SELECT o.event_id FROM webhook_outbox o ORDER BY id DESC LIMIT 1")
    cursor = validation.encode_cursor("deliveries", (middle,))
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0, tzinfo=None)

    def ago(hours: float) -> str:
        return (now - datetime.timedelta(hours=hours)).isoformat(timespec="seconds")

    return [
        ("overview", "/ui/"),
        ("overview refresh", "/ui/overview/stats"),
        ("subscriptions", "/ui/subscriptions"),
        ("subscriptions search", "/ui/subscriptions?search=endpoint+7"),
        ("subscription detail", f"/ui/subscriptions/{sub}"),
        ("deliveries", "/ui/deliveries"),
        ("deliveries, middle page", f"/ui/deliveries?cursor={cursor}"),
        ("deliveries state=dead", "/ui/deliveries?state=dead"),
        ("deliveries by subscription", f"/ui/deliveries?subscription_id={sub}"),
        (
            "deliveries dead + subscription",
            f"/ui/deliveries?state=dead&subscription_id={sub}",
        ),
        ("deliveries event_type (1 in 7)", "/ui/deliveries?event_type=order.refunded"),
        ("deliveries, last hour", f"/ui/deliveries?created_after={ago(1)}"),
        (
            "deliveries, 1 h window 12 h back",
            f"/ui/deliveries?created_after={ago(13)}&created_before={ago(12)}",
        ),
        ("deliveries, before any", "/ui/deliveries?created_before=2000-01-01T00:00"),
        ("delivery detail", f"/ui/deliveries/{dead}"),
        ("dead letters", "/ui/dead-letters"),
        ("event lookup", f"/ui/events?event_id={event}"),
    ]


async def measure(base: str, pool: Any, runs: int) -> None:
    client = ConsoleClient(base)
    try:
        signed = await client.sign_in(TOKEN)
        assert signed.status == 303, signed.status
        print(f"  {'page':<34} server time (Server-Timing)                   wall median")
        for name, path in await page_list(pool):
            server_ms, wall_ms = [], []
            for _ in range(runs):
                started = time.perf_counter()
                page = await client.get(path)
                wall_ms.append((time.perf_counter() - started) * 1000)
                assert page.status == 200, (path, page.status, page.text[:300])
                timing = re.fullmatch(r"app;dur=([0-9.]+)", page.headers["Server-Timing"])
                assert timing is not None
                server_ms.append(float(timing.group(1)))
            wall = sorted(wall_ms)[len(wall_ms) // 2]
            print(f"  {name:<34} {summary(server_ms)}  {wall:7.2f} ms")
    finally:
        await client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=1_000_000)
    parser.add_argument("--subscriptions", type=int, default=100)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    async with server_dsn() as server:
        dsn = await fresh_database(server, DATABASE)
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=8)
        try:
            seconds = await seed(pool, args.deliveries, args.subscriptions, args.hours)
            print(
                f"seeded {args.deliveries} deliveries (one attempt each) over "
                f"{args.subscriptions} subscriptions and {args.hours:g} h in {seconds:.0f} s"
            )
            runner, base = await serve(pool)
            try:
                await measure(base, pool, args.runs)
            finally:
                await runner.cleanup()
        finally:
            await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
