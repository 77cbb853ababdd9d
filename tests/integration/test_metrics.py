"""The /metrics exposition of a running dispatcher, and the database-derived gauges.

Real Postgres, real receivers, the real admin listener: counters are checked against what the
receivers saw, every contract metric and label must be exposed, the
scrape must pass ``promtool check metrics``, and the incrementally kept queue counts
(sql/004_metrics.sql) must equal an exact count after every kind of write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from typing import Any

import aiohttp
import prometheus_client as prom
import pytest
from prometheus_client import parser

import dispatcher
from dispatcher import gauges, metrics
from dispatcher.db import gauges as db_gauges
from tests import support

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# The metrics contract: metric → (type, label names).
CONTRACT: dict[str, tuple[str, set[str]]] = {
    "dispatcher_attempts_total": ("counter", {"subscription", "outcome"}),
    "dispatcher_attempt_duration_seconds": ("histogram", {"subscription"}),
    "dispatcher_delivery_latency_seconds": ("histogram", {"subscription"}),
    "dispatcher_deliveries_total": ("counter", {"subscription", "result"}),
    "dispatcher_queue_depth": ("gauge", {"subscription", "state"}),
    "dispatcher_oldest_pending_age_seconds": ("gauge", {"subscription"}),
    "dispatcher_outbox_backlog": ("gauge", set()),
    "dispatcher_in_flight": ("gauge", {"subscription"}),
    "dispatcher_subscription_up": ("gauge", {"subscription"}),
}


async def scrape(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain")
        return await response.text()


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


async def test_exposition_matches_what_the_receivers_saw(
    pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    ok, flaky, broken = [await make_receiver() for _ in range(3)]
    flaky.respond = lambda n, _h, _b: (500 if n == 0 else 200, {}, 0.0)
    broken.respond = lambda _n, _h, _b: (500, {}, 0.0)
    subs = {
        name: await support.subscribe(pool, r.url) for name, r in (("ok", ok), ("flaky", flaky))
    }
    subs["broken"] = await support.subscribe(pool, broken.url)
    async with pool.acquire() as conn:
        await dispatcher.publish(conn, "t.created", {"n": 1})
    running = await start_dispatcher(gauge_interval_seconds=0.05)
    port = running.dispatcher.bound_port
    max_attempts = running.dispatcher.settings.retry.max_attempts

    async def settled() -> Samples | None:
        got = samples(await scrape(port))
        queued = sum(
            value(got, "dispatcher_queue_depth", subscription=s, state=state) or 0
            for s in subs.values()
            for state in ("pending", "in_flight", "retrying")
        )
        dead = value(got, "dispatcher_queue_depth", subscription=subs["broken"], state="dead")
        finished = sum(v for (name, _), v in got.items() if name == "dispatcher_deliveries_total")
        # The dead letter's operational event (dispatcher.delivery.dead, which nobody here
        # subscribes to) is routed too before the figures are final.
        backlog = value(got, "dispatcher_outbox_backlog")
        return got if (queued, dead, finished, backlog) == (0, 1, 3, 0) else None

    got = await support.wait_for(settled, timeout=15, message="every delivery finished")

    # Counters against the receivers: one row per (subscription, outcome) they caused.
    seen = {"ok": ok, "flaky": flaky, "broken": broken}
    for name, receiver in seen.items():
        sub = subs[name]
        statuses = [r.status for r in receiver.requests]
        assert value(got, "dispatcher_attempts_total", subscription=sub, outcome="success") == (
            statuses.count(200) or None
        )
        assert value(got, "dispatcher_attempts_total", subscription=sub, outcome="http_5xx") == (
            statuses.count(500) or None
        )
        count = value(got, "dispatcher_attempt_duration_seconds_count", subscription=sub)
        assert count == len(statuses)
    assert len(broken.requests) == max_attempts
    assert value(got, "dispatcher_deliveries_total", subscription=subs["ok"], result="delivered")
    assert value(got, "dispatcher_deliveries_total", subscription=subs["flaky"], result="delivered")
    assert value(got, "dispatcher_deliveries_total", subscription=subs["broken"], result="dead")
    assert (
        value(got, "dispatcher_retries_scheduled_total", subscription=subs["broken"])
        == max_attempts - 1
    )
    for sub in subs.values():
        assert value(got, "dispatcher_subscription_up", subscription=sub) == 1
        assert value(got, "dispatcher_in_flight", subscription=sub) == 0
        assert value(got, "dispatcher_oldest_pending_age_seconds", subscription=sub) == 0
    assert value(got, "dispatcher_delivery_latency_seconds_count", subscription=subs["ok"]) == 1
    assert value(got, "dispatcher_outbox_backlog") == 0
    assert value(got, "dispatcher_events_routed_total", result="routed") == 1
    assert (value(got, "dispatcher_db_pool_connections", state="max") or 0) >= 1
    assert value(got, "dispatcher_db_stats_last_refresh_timestamp_seconds")

    # Every contract metric with exactly its labels, every contract label value present.
    text = await scrape(port)
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    for name, (kind, labels) in CONTRACT.items():
        family = families[name.removesuffix("_total")]
        assert family.type == kind, name
        assert family.samples, name
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    states = {s.labels["state"] for s in families["dispatcher_queue_depth"].samples}
    assert states == set(metrics.QUEUE_STATES)
    results = {s.labels["result"] for s in families["dispatcher_deliveries"].samples}
    assert results == {"delivered", "dead"}
    buckets = families["dispatcher_attempt_duration_seconds"].samples
    assert {s.labels["le"] for s in buckets if "le" in s.labels} >= {"0.005", "10.0", "+Inf"}
    _promtool_check_metrics(text)


def _promtool_check_metrics(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        reason = "promtool not installed (Debian package `prometheus`; see .ci/tools.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the database gauges ---------------------------------------------------------------------


async def _exact(pool: Any) -> dict[tuple[str, str], int]:
    rows = await pool.fetch(
        """
        SELECT subscription_id::text AS s, state, count(*) AS n FROM webhook_deliveries
        WHERE state IN ('pending', 'in_flight', 'retrying', 'dead', 'parked')
        GROUP BY 1, 2
        """
    )
    return {(r["s"], r["state"]): r["n"] for r in rows}


async def _tracked(pool: Any) -> dict[tuple[str, str], int]:
    async with pool.acquire() as conn:
        snapshot = await db_gauges.read(conn)
    return {key: n for key, n in snapshot.depth.items() if n}


async def _seed(pool: Any, subscriptions: int, events: int) -> list[str]:
    """Subscriptions created in a known order, and `events` deliveries each (SQL, no routing)."""
    ids = [str(uuid.UUID(int=i + 1)) for i in range(subscriptions)]
    await pool.execute(
        """
        INSERT INTO webhook_subscriptions (id, url, event_types, secret, created_at)
        SELECT id, 'http://127.0.0.1:9/', '{t.x}', 's', now() - make_interval(secs => 100 - n)
        FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, n)
        """,
        ids,
    )
    await pool.execute(
        """
        WITH o AS (
            INSERT INTO webhook_outbox (event_type, payload, routed_at, route_result, created_at)
            SELECT 't.x', '{}', now(), 'routed', now() - make_interval(secs => g)
            FROM generate_series(1, $1) g
            RETURNING id, created_at
        )
        INSERT INTO webhook_deliveries (outbox_id, subscription_id, event_created_at)
        SELECT o.id, s.id, o.created_at FROM o CROSS JOIN webhook_subscriptions s
        """,
        events,
    )
    return ids


async def test_tracked_counts_equal_an_exact_count_after_every_kind_of_write(pool: Any) -> None:
    ids = await _seed(pool, subscriptions=3, events=20)
    assert await _tracked(pool) == await _exact(pool) == {(s, "pending"): 20 for s in ids}
    writes = [
        "UPDATE webhook_deliveries SET state = 'in_flight' WHERE id % 3 = 0",
        "UPDATE webhook_deliveries SET state = 'retrying' WHERE id % 5 = 0 AND state = 'in_flight'",
        "UPDATE webhook_deliveries SET state = 'dead' WHERE id % 7 = 0",
        "UPDATE webhook_deliveries SET state = 'delivered' WHERE id % 4 = 0",
        "UPDATE webhook_deliveries SET updated_at = now()",  # no state change at all
        "UPDATE webhook_deliveries SET state = 'parked' WHERE id % 11 = 0",
        "DELETE FROM webhook_deliveries WHERE id % 13 = 0",
        "DELETE FROM webhook_outbox WHERE id = 2",  # cascades to its deliveries
        f"DELETE FROM webhook_subscriptions WHERE id = '{ids[0]}'",  # cascades too
    ]
    for sql in writes:
        await pool.execute(sql)
        assert await _tracked(pool) == await _exact(pool), sql
    async with pool.acquire() as conn:
        before = await conn.fetchval("SELECT count(*) FROM webhook_delivery_count_deltas")
        assert await db_gauges.compact(conn)
        after = await conn.fetchval("SELECT count(*) FROM webhook_delivery_count_deltas")
    assert after < before
    assert after == len(await _exact(pool))
    assert await _tracked(pool) == await _exact(pool)
    await pool.execute("TRUNCATE webhook_outbox CASCADE")  # cascades to deliveries
    assert await _tracked(pool) == {}


def _gauge(registry: prom.CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_refresh_folds_subscriptions_beyond_the_limit(pool: Any) -> None:
    ids = await _seed(pool, subscriptions=4, events=3)
    # The two newest subscriptions fold into "other": their work differs so sum/max show.
    await pool.execute(
        "UPDATE webhook_deliveries SET state = 'dead' WHERE subscription_id = $1", uuid.UUID(ids[3])
    )
    await pool.execute(
        "UPDATE webhook_subscriptions SET paused_until = now() + interval '1 minute' WHERE id = $1",
        uuid.UUID(ids[2]),
    )
    await pool.execute("INSERT INTO webhook_outbox (event_type, payload) VALUES ('t.x', '{}')")
    registry = prom.CollectorRegistry()
    m = metrics.Metrics(registry, max_subscriptions=2)
    loop = gauges.GaugeLoop(pool, m, interval_seconds=1)
    await loop.refresh()

    def depth(sub: str, state: str) -> float | None:
        return _gauge(registry, "dispatcher_queue_depth", subscription=sub, state=state)

    assert [depth(s, "pending") for s in ids[:2]] == [3, 3]
    assert depth("other", "pending") == 3  # the third subscription's; the fourth's are dead
    assert depth("other", "dead") == 3
    assert depth(ids[2], "pending") is None
    assert _gauge(registry, "dispatcher_subscription_up", subscription=ids[0]) == 1
    assert _gauge(registry, "dispatcher_subscription_up", subscription="other") == 0  # paused
    ages = [
        _gauge(registry, "dispatcher_oldest_pending_age_seconds", subscription=s)
        for s in (ids[0], "other")
    ]
    # Events were written 1..3 s in the past.
    assert all(a is not None and 3 <= a < 60 for a in ages), ages
    # The event, and the operational events announcing the fourth subscription's 3 dead letters.
    assert _gauge(registry, "dispatcher_outbox_backlog") == 4

    # Disabled is down too; a deleted subscription's series disappear on the next refresh.
    await pool.execute(
        "UPDATE webhook_subscriptions SET enabled = false WHERE id = $1", uuid.UUID(ids[0])
    )
    await pool.execute("DELETE FROM webhook_subscriptions WHERE id = $1", uuid.UUID(ids[1]))
    await loop.refresh()
    assert depth(ids[1], "pending") is None
    assert _gauge(registry, "dispatcher_subscription_up", subscription=ids[0]) == 0
    assert _gauge(registry, "dispatcher_subscription_up", subscription=ids[1]) is None


async def test_backlog_above_the_exact_limit_is_the_unrouted_id_span(
    pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_gauges, "BACKLOG_EXACT_LIMIT", 5)
    await pool.execute(
        "INSERT INTO webhook_outbox (event_type, payload) SELECT 't.x', '{}' "
        "FROM generate_series(1, 12)"
    )
    async with pool.acquire() as conn:
        assert (await db_gauges.read(conn)).outbox_backlog == 12
        await conn.execute("UPDATE webhook_outbox SET routed_at = now() WHERE id IN (1, 12)")
        assert (await db_gauges.read(conn)).outbox_backlog == 10
        await conn.execute("UPDATE webhook_outbox SET routed_at = now() WHERE id < 9")
        assert (await db_gauges.read(conn)).outbox_backlog == 3  # below the cap: exact


async def test_openmetrics_when_asked_and_no_created_series(start_dispatcher: Any) -> None:
    running = await start_dispatcher()
    url = f"http://127.0.0.1:{running.dispatcher.bound_port}/metrics"
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Accept": accept}) as resp:
            open_type, open_body = resp.headers["Content-Type"], await resp.text()
        async with session.get(url) as resp:
            plain_type, plain_body = resp.headers["Content-Type"], await resp.text()
    assert open_type.startswith("application/openmetrics-text; version=1.0.0")
    assert open_body.endswith("# EOF\n")
    assert plain_type.startswith("text/plain; version=0.0.4")
    assert "dispatcher_attempts_total" in plain_body or "dispatcher_build_info" in plain_body
    assert "_created" not in open_body
    assert "_created" not in plain_body
