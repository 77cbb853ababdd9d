"""Metrics reads: queue depth by state, the oldest undelivered age, the outbox backlog and
subscription state, plus the fold of the count delta rows (sql/004_metrics.sql).

Plain snapshot reads, cheap with millions of queued rows; the only write is the compaction,
under an advisory lock. What the numbers become (labels, folding, gauges) is
``dispatcher.gauges``. Never touches the delivery tables.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any

from dispatcher import model

# Above this many unrouted rows the backlog is the id span of the unrouted rows (an upper
# bound that costs two index probes) instead of an exact count.
BACKLOG_EXACT_LIMIT = 10_000
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
-- individually. Oldest age, only for subscriptions whose counts say they have work: one probe
-- of webhook_deliveries_oldest for the queued rows (min() over a partial index becomes a
-- LIMIT 1 scan) and the in-flight rows from webhook_deliveries_in_flight (at most
-- max_in_flight); least() skips the side that has none (sql/013_hot_path.sql).
SELECT s.id::text AS id, s.url, s.description,
       -- Up: enabled and not paused by the circuit breaker (sql/005_reliability.sql).
       s.enabled AND (s.paused_until IS NULL OR s.paused_until <= now()) AS up,
       s.enabled AND s.paused_until > now() IS TRUE AS paused,
       CASE WHEN s.id = ANY($1::uuid[]) THEN
           extract(epoch FROM now() - least(
               (SELECT min(d.event_created_at) FROM webhook_deliveries d
                WHERE d.subscription_id = s.id AND d.state IN ('pending', 'retrying')),
               (SELECT min(d.event_created_at) FROM webhook_deliveries d
                WHERE d.subscription_id = s.id AND d.state = 'in_flight')))::float8
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


async def read(conn: Any) -> Snapshot:
    """Three cheap statements on one connection (see the module docstring for their cost)."""
    depth: dict[tuple[str, str], int] = {}
    active: set[str] = set()
    delta_rows = 0
    for row in await conn.fetch(_DEPTH_SQL):
        depth[(row["subscription_id"], row["state"])] = row["n"]
        delta_rows += row["delta_rows"]
        if row["state"] in model.ACTIVE_STATES and row["n"] > 0:
            active.add(row["subscription_id"])
    subscriptions = tuple(
        Subscription(
            r["id"],
            r["up"],
            r["oldest_age_seconds"],
            host=urllib.parse.urlsplit(r["url"]).hostname or "",
            description=r["description"],
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
