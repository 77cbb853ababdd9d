"""Database-derived gauges, refreshed on an interval by ``GaugeLoop`` (never per scrape).

Queue depth by state, oldest pending age, outbox backlog and subscription state are read from
the shared database, so every replica reports the same database-wide numbers; dashboards and
alerts take ``max by (...)`` over replicas. The queries stay cheap with millions of queued
rows: depth sums the incrementally kept deltas of ``sql/004_metrics.sql`` (one row per
subscription and state), the oldest age is one index probe per subscription with queued work,
and the outbox backlog is counted exactly only up to a cap.

This module only reads, apart from folding the delta rows (under an advisory lock, one replica
at a time); it never touches the delivery tables and holds no connection between refreshes.
Its SQL lives here rather than in ``db/repository.py`` because it serves nothing but metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from dispatcher import metrics
from dispatcher.db import pool as db_pool

log = structlog.get_logger("dispatcher.gauges")

# Lost or restarted database (incl. asyncpg's InternalClientError): log, count, try again.
DB_ERRORS = db_pool.ERRORS
# Undelivered states; parked work (subscription disabled) is reported by subscription_up.
ACTIVE_STATES = ("pending", "in_flight", "retrying")
# Above this many unrouted rows the backlog is the id span of the unrouted rows (an upper
# bound that costs two index probes) instead of an exact count.
BACKLOG_EXACT_LIMIT = 10_000
# Fold the delta rows once they outnumber the groups by this much (not on every refresh:
# rewriting every group each time would churn the table for nothing).
COMPACT_SLACK_ROWS = 1_000
COMPACT_LOCK_ID = 7_301_946_113

_DEPTH_SQL = """
-- No locks: a plain snapshot read of the per-group deltas (sql/004_metrics.sql).
SELECT subscription_id::text AS subscription_id, state, sum(delta)::bigint AS n,
       count(*) AS delta_rows
FROM webhook_delivery_count_deltas
GROUP BY subscription_id, state
"""

_SUBSCRIPTIONS_SQL = """
-- No locks. A stable order (oldest first) so every replica labels the same subscriptions
-- individually. Oldest age: one probe of webhook_deliveries_oldest (min() over a partial
-- index becomes a LIMIT 1 scan), only for subscriptions whose counts say they have work.
SELECT s.id::text AS id, s.url, s.description,
       -- Up: enabled and not paused by the circuit breaker (sql/005_reliability.sql).
       s.enabled AND (s.paused_until IS NULL OR s.paused_until <= now()) AS up,
       s.enabled AND s.paused_until > now() IS TRUE AS paused,
       CASE WHEN s.id = ANY($1::uuid[]) THEN
           extract(epoch FROM now() - (
               SELECT min(d.event_created_at) FROM webhook_deliveries d
               WHERE d.subscription_id = s.id
                 AND d.state IN ('pending', 'in_flight', 'retrying')))::float8
       END AS oldest_age_seconds
FROM webhook_subscriptions s
ORDER BY s.created_at, s.id
"""

_BACKLOG_SQL = """
-- No locks. Exact below the cap (webhook_outbox_unrouted), else the id span of the unrouted
-- rows: two index endpoint probes, an upper bound (identity gaps from rolled-back inserts).
SELECT (SELECT count(*) FROM (SELECT 1 FROM webhook_outbox WHERE routed_at IS NULL LIMIT $1) x)
           AS capped,
       (SELECT max(id) - min(id) + 1 FROM webhook_outbox WHERE routed_at IS NULL) AS span
"""

_COMPACT_SQL = """
-- Replace the delta rows by one row per group. Runs under an advisory lock (one replica at a
-- time); the hot path only inserts, so nothing waits on the rows deleted here, and the totals
-- a reader sees are the same before and after the commit.
WITH moved AS (
    DELETE FROM webhook_delivery_count_deltas
    RETURNING subscription_id, state, delta
)
INSERT INTO webhook_delivery_count_deltas (subscription_id, state, delta)
SELECT subscription_id, state, sum(delta)
FROM moved
GROUP BY subscription_id, state
HAVING sum(delta) <> 0
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    enabled: bool  # and not paused
    # Seconds since the oldest undelivered delivery's event was written; None when idle.
    oldest_age_seconds: float | None = None
    # What dispatcher_subscription_info shows a person: the URL's host and the description.
    host: str = ""
    description: str = ""
    paused: bool = False  # by the circuit breaker (enabled, resumes by itself)


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """What the database says now, before label folding."""

    subscriptions: tuple[Subscription, ...]  # stable order: created_at, id
    depth: dict[tuple[str, str], int]  # (subscription id, state) → deliveries
    outbox_backlog: int
    delta_rows: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Folded:
    """Gauge values per label value, ``other`` included."""

    depth: dict[tuple[str, str], int]  # (label, state) → deliveries
    oldest_age_seconds: dict[str, float]
    up: dict[str, int]
    # (label, host, description) of every subscription that has a label of its own.
    info: frozenset[tuple[str, str, str]] = frozenset()
    paused: dict[str, int] = dataclasses.field(default_factory=dict)


def fold(snapshot: Snapshot, label: Callable[[str], str]) -> Folded:
    """Map subscriptions to bounded label values: counts add up, the oldest age is the max
    and ``up`` the min (a folded group is down when any member is)."""
    depth: dict[tuple[str, str], int] = {}
    oldest: dict[str, float] = {}
    up: dict[str, int] = {}
    labels: dict[str, str] = {}
    info: set[tuple[str, str, str]] = set()
    paused: dict[str, int] = {}
    for sub in snapshot.subscriptions:
        name = labels[sub.id] = label(sub.id)
        if name != metrics.OTHER:
            info.add((name, sub.host, sub.description))
        for state in metrics.QUEUE_STATES:
            depth.setdefault((name, state), 0)
        oldest[name] = max(oldest.get(name, 0.0), sub.oldest_age_seconds or 0.0)
        up[name] = min(up.get(name, 1), int(sub.enabled))
        paused[name] = max(paused.get(name, 0), int(sub.paused))
    for (sub_id, state), n in snapshot.depth.items():
        if state not in metrics.QUEUE_STATES:
            continue
        # Deltas for a subscription deleted since the listing read are dropped with it.
        folded_name = labels.get(sub_id)
        if folded_name is not None:
            depth[(folded_name, state)] += n
    return Folded(
        depth=depth, oldest_age_seconds=oldest, up=up, info=frozenset(info), paused=paused
    )


async def read(conn: Any) -> Snapshot:
    """Three cheap statements on one connection (see the module docstring for their cost)."""
    depth: dict[tuple[str, str], int] = {}
    active: set[str] = set()
    delta_rows = 0
    for row in await conn.fetch(_DEPTH_SQL):
        depth[(row["subscription_id"], row["state"])] = row["n"]
        delta_rows += row["delta_rows"]
        if row["state"] in ACTIVE_STATES and row["n"] > 0:
            active.add(row["subscription_id"])
    subscriptions = tuple(
        Subscription(
            r["id"],
            r["up"],
            r["oldest_age_seconds"],
            host=urllib.parse.urlsplit(r["url"]).hostname or "",
            description=r["description"][: metrics.INFO_DESCRIPTION_CHARS],
            paused=r["paused"],
        )
        for r in await conn.fetch(_SUBSCRIPTIONS_SQL, sorted(active))
    )
    backlog = await conn.fetchrow(_BACKLOG_SQL, BACKLOG_EXACT_LIMIT + 1)
    capped = int(backlog["capped"])
    outbox_backlog = capped if capped <= BACKLOG_EXACT_LIMIT else int(backlog["span"])
    return Snapshot(subscriptions, depth, outbox_backlog, delta_rows)


async def compact(conn: Any) -> bool:
    """Fold the delta rows; False when another replica is doing it right now."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", COMPACT_LOCK_ID):
            return False
        await conn.execute(_COMPACT_SQL)
    return True


def needs_compaction(snapshot: Snapshot) -> bool:
    return snapshot.delta_rows > 2 * len(snapshot.depth) + COMPACT_SLACK_ROWS


def bind_pool(m: metrics.Metrics, pool: Any) -> None:
    """Pool usage is this process's own and read at scrape time, not from the database.
    ``state="max"`` is the pool's ceiling, so saturation is ``in_use / max``."""
    m.db_pool_connections.labels(state="in_use").set_function(
        lambda: pool.get_size() - pool.get_idle_size()
    )
    m.db_pool_connections.labels(state="idle").set_function(pool.get_idle_size)
    m.db_pool_connections.labels(state="max").set_function(pool.get_max_size)


class GaugeLoop:
    """Refreshes the database gauges every ``interval_seconds`` until stopped."""

    def __init__(self, pool: Any, m: metrics.Metrics, *, interval_seconds: float) -> None:
        self._pool = pool
        self._metrics = m
        self._interval = interval_seconds
        # Label sets published last time, so series of deleted subscriptions are removed.
        self._published: dict[str, set[tuple[str, ...]]] = {}

    async def refresh(self) -> Snapshot:
        started = time.perf_counter()
        async with self._pool.acquire() as conn:
            snapshot = await read(conn)
            if needs_compaction(snapshot):
                await compact(conn)
        self.publish(fold(snapshot, self._metrics.label))
        m = self._metrics
        m.outbox_backlog.set(snapshot.outbox_backlog)
        m.gauge_refresh_seconds.set(time.perf_counter() - started)
        m.gauge_refreshed.set_to_current_time()
        return snapshot

    def publish(self, folded: Folded) -> None:
        m = self._metrics
        self._replace(m.queue_depth, "queue_depth", _items(folded.depth))
        self._replace(
            m.oldest_pending_age,
            "oldest_pending_age",
            (((name,), age) for name, age in folded.oldest_age_seconds.items()),
        )
        self._replace(
            m.subscription_up, "subscription_up", (((name,), v) for name, v in folded.up.items())
        )
        # Every subscription, 0 or 1, so "disabled, not paused" can be told apart in PromQL.
        self._replace(
            m.subscription_paused,
            "subscription_paused",
            (((name,), v) for name, v in folded.paused.items()),
        )
        self._replace(
            m.subscription_info, "subscription_info", ((labels, 1.0) for labels in folded.info)
        )
        for name in folded.up:
            # Counters exist at 0 before their first increment: otherwise increase() misses a
            # subscription's first dead letter (the series would start at 1) and drill-down
            # panels show "no data" instead of 0.
            m.deliveries.labels(subscription=name, result="delivered")
            m.deliveries.labels(subscription=name, result="dead")
            m.retries_scheduled.labels(subscription=name)

    def _replace(
        self, gauge: Any, key: str, values: Iterable[tuple[tuple[str, ...], float]]
    ) -> None:
        seen: set[tuple[str, ...]] = set()
        for label_values, value in values:
            gauge.labels(*label_values).set(value)
            seen.add(label_values)
        for stale in self._published.get(key, set()) - seen:
            with contextlib.suppress(KeyError):  # already gone: nothing to remove
                gauge.remove(*stale)
        self._published[key] = seen

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh()
            except DB_ERRORS as exc:
                self._metrics.gauge_refresh_errors.inc()
                log.warning("gauge_refresh_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)


def _items(
    values: dict[tuple[str, str], int],
) -> Iterable[tuple[tuple[str, ...], float]]:
    return ((key, float(n)) for key, n in values.items())
