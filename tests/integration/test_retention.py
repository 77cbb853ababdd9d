"""Retention: old delivered work and old attempts go, in small batches; everything younger,
dead, parked or unfinished stays; locked rows are skipped, never waited on."""

from __future__ import annotations

import asyncio
from typing import Any

import prometheus_client as prom

import dispatcher
from dispatcher import config, metrics, retention
from tests import support

POLICY = config.RetentionPolicy(
    delivered_seconds=3600, attempts_seconds=7200, batch=7, interval_seconds=0.05
)


async def _seed(pool: Any, sid: str, n: int, *, state: str, age_seconds: float) -> list[int]:
    """n routed events for ``sid`` with one delivery each, in ``state``, backdated."""
    rows = await pool.fetch(
        """
        WITH ev AS (
            INSERT INTO webhook_outbox (event_type, payload, created_at, routed_at, route_result,
                                        delivery_count)
            SELECT 'e.x', jsonb_build_object('i', g), now() - make_interval(secs => $3),
                   now() - make_interval(secs => $3), 'routed', 1
            FROM generate_series(1, $2) g
            RETURNING id, created_at
        ), d AS (
            INSERT INTO webhook_deliveries (outbox_id, subscription_id, state, attempt,
                                            event_created_at, finished_at)
            SELECT ev.id, $1::uuid, $4, 1, ev.created_at,
                   CASE WHEN $4 IN ('delivered', 'dead') THEN ev.created_at END
            FROM ev
            RETURNING id
        )
        INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, outcome)
        SELECT d.id, 1, now() - make_interval(secs => $3), 1.0, 'success' FROM d
        RETURNING delivery_id
        """,
        sid,
        n,
        float(age_seconds),
        state,
    )
    return [r["delivery_id"] for r in rows]


async def _count(pool: Any, table: str) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {table}"))


async def test_prunes_only_old_delivered_work_and_old_attempts(pool: Any) -> None:
    sid = await support.subscribe(pool)
    old_delivered = await _seed(pool, sid, 20, state="delivered", age_seconds=5000)
    young_delivered = await _seed(pool, sid, 5, state="delivered", age_seconds=60)
    old_dead = await _seed(pool, sid, 4, state="dead", age_seconds=9000)
    old_pending = await _seed(pool, sid, 3, state="retrying", age_seconds=5000)
    # An unmatched event (no deliveries), old: goes too.
    await pool.execute(
        "INSERT INTO webhook_outbox (event_type, payload, created_at, routed_at, route_result,"
        " delivery_count) VALUES ('nobody', '{}', now() - interval '2 hours',"
        " now() - interval '2 hours', 'unmatched', 0)"
    )
    registry = prom.CollectorRegistry()
    m = metrics.Metrics(registry)
    got = await retention.Pruner(pool, m, POLICY).prune_once()

    left = {r["id"] for r in await pool.fetch("SELECT id FROM webhook_deliveries")}
    assert left == set(young_delivered + old_dead + old_pending)
    assert got.deliveries == 20
    assert got.events == 21  # 20 fully delivered events + the unmatched one
    assert got.batches > 3  # batch = 7: it really went in small steps
    # Dead deliveries keep their rows but their attempts aged out (9000 s > 7200 s).
    attempts = {r["delivery_id"] for r in await pool.fetch("SELECT * FROM webhook_attempts")}
    assert attempts == set(young_delivered + old_pending)
    assert got.attempts == 4
    assert await _count(pool, "webhook_outbox") == 5 + 4 + 3
    assert (
        registry.get_sample_value("dispatcher_retention_pruned_total", {"table": "deliveries"})
        == 20
    )
    # A second pass finds nothing.
    again = await retention.Pruner(pool, m, POLICY).prune_once()
    assert (again.deliveries, again.events, again.attempts) == (0, 0, 0)
    assert set(old_delivered).isdisjoint(left)


async def test_rows_locked_by_someone_else_are_skipped_not_waited_on(pool: Any) -> None:
    sid = await support.subscribe(pool)
    await _seed(pool, sid, 10, state="delivered", age_seconds=5000)
    first = await pool.fetchval("SELECT min(id) FROM webhook_outbox")
    async with pool.acquire() as conn, conn.transaction():
        # e.g. a replay holding the oldest event
        await conn.execute("SELECT 1 FROM webhook_outbox WHERE id = $1 FOR UPDATE", first)
        got = await asyncio.wait_for(
            retention.Pruner(pool, metrics.Metrics(prom.CollectorRegistry()), POLICY).prune_once(),
            5,
        )
    assert got.events == 9
    assert await _count(pool, "webhook_outbox") == 1


async def test_pruning_runs_beside_live_delivery_without_holding_it_up(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    old_sid = await support.subscribe(pool)
    await _seed(pool, old_sid, 1500, state="delivered", age_seconds=5000)
    await support.subscribe(pool, receiver.url)
    policy = config.RetentionPolicy(
        delivered_seconds=3600, attempts_seconds=7200, batch=100, interval_seconds=0.05
    )
    running = await start_dispatcher(retention=policy)
    async with pool.acquire() as conn, conn.transaction():
        for i in range(100):
            await dispatcher.publish(conn, "e.live", {"i": i}, subscription_id=None)
    await support.wait_for(
        lambda: len(receiver.requests) >= 100, timeout=15, message="live events delivered"
    )
    await support.wait_for(
        lambda: _pruned(running, 1500), timeout=15, message="old deliveries pruned"
    )
    assert len(set(receiver.ids())) == 100
    live = await pool.fetchval(
        "SELECT count(*) FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.outbox_id"
        " WHERE o.event_type = 'e.live' AND d.state = 'delivered'"
    )
    assert live == 100  # young: kept


def _pruned(running: Any, n: int) -> bool:
    value = running.dispatcher.registry.get_sample_value(
        "dispatcher_retention_pruned_total", {"table": "deliveries"}
    )
    return bool(value and value >= n)


async def test_a_deliverys_attempts_go_with_it_however_it_is_deleted(pool: Any) -> None:
    """The attempt log has no foreign key (sql/013): a trigger deletes a delivery's attempts
    with it, whether the delivery itself, its event or its subscription is deleted, or the
    table is truncated."""
    keep = await support.subscribe(pool)
    gone = await support.subscribe(pool)
    kept = await _seed(pool, keep, 3, state="delivered", age_seconds=60)
    direct = await _seed(pool, gone, 2, state="delivered", age_seconds=60)
    by_event = await _seed(pool, gone, 2, state="dead", age_seconds=60)
    await _seed(pool, gone, 2, state="retrying", age_seconds=60)

    async def logged() -> set[int]:
        return {r["delivery_id"] for r in await pool.fetch("SELECT * FROM webhook_attempts")}

    await pool.execute("DELETE FROM webhook_deliveries WHERE id = ANY ($1::bigint[])", direct)
    await pool.execute(
        "DELETE FROM webhook_outbox o USING webhook_deliveries d"
        " WHERE d.outbox_id = o.id AND d.id = ANY ($1::bigint[])",
        by_event,
    )
    await pool.execute("DELETE FROM webhook_subscriptions WHERE id = $1::uuid", gone)
    assert await logged() == set(kept)
    await pool.execute("TRUNCATE webhook_deliveries")
    assert await logged() == set()
