"""Endpoint health statements: the failing window, breaker pauses, probe slots and the audit
trail of ``webhook_subscriptions``.

Only SQL and row conversion; the decisions (when to pause, probe, resume or disable) belong to
``dispatcher.endpoint_health``. Every pause, resume, disable and enable is recorded by a
trigger in ``webhook_subscription_events`` (sql/005_reliability.sql).
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Sequence
from typing import Any

from dispatcher.db import operational, repository

_SUCCESS_SQL = """
-- Plain row updates of the subscriptions named; a failure another replica recorded after
-- this success is kept (failing_since later than the success).
UPDATE webhook_subscriptions s
SET failing_since = CASE WHEN s.failing_since > to_timestamp(u.t) THEN s.failing_since END,
    last_success_at = greatest(s.last_success_at, to_timestamp(u.t))
FROM unnest($1::uuid[], $2::float8[]) AS u(id, t)
WHERE s.id = u.id
"""

_FAILURE_SQL = """
-- Start the failing window unless it is already running or a later success ended it.
UPDATE webhook_subscriptions s
SET failing_since = to_timestamp(u.t)
FROM unnest($1::uuid[], $2::float8[]) AS u(id, t)
WHERE s.id = u.id AND s.failing_since IS NULL
  AND (s.last_success_at IS NULL OR s.last_success_at < to_timestamp(u.t))
"""

_PAUSE_SQL = """
-- Trip (or re-trip after a failed probe): pause for base * 2^pauses, capped. Row lock via
-- UPDATE; a subscription already paused by another replica is left as it is unless this is
-- a failed probe ($5), which always extends the pause.
UPDATE webhook_subscriptions s
SET paused_until = now() + make_interval(secs => p.secs + $4),
    probe_at = now() + make_interval(secs => p.secs),
    pause_count = s.pause_count + 1,
    paused_reason = $2
FROM (SELECT least($3::float8 * power(2.0::float8, least(pause_count, 30)), $6::float8) AS secs
      FROM webhook_subscriptions WHERE id = $1) p
WHERE s.id = $1 AND s.enabled AND ($5 OR s.paused_until IS NULL OR s.paused_until <= now())
RETURNING p.secs
"""

_RESUME_SQL = """
-- Close the breaker (the audit trigger records 'resumed' with the reason set below) and
-- wake every replica's claimer.
WITH resumed AS (
    UPDATE webhook_subscriptions
    SET paused_until = NULL, probe_at = NULL, pause_count = 0, paused_reason = NULL
    WHERE id = $1 AND paused_until IS NOT NULL
    RETURNING id
)
SELECT count(*) FROM resumed
"""

_PROBE_SLOT_SQL = """
-- Take the probe slot of paused subscriptions whose probe is due: the row lock (SKIP LOCKED)
-- and the moved probe_at make sure one replica probes at a time.
UPDATE webhook_subscriptions s
SET probe_at = now() + make_interval(secs => $1),
    paused_until = greatest(s.paused_until, now() + make_interval(secs => $1 + $2))
WHERE s.id IN (SELECT id FROM webhook_subscriptions
               WHERE enabled AND paused_until > now() AND probe_at <= now()
               ORDER BY probe_at
               LIMIT $3
               FOR UPDATE SKIP LOCKED)
RETURNING s.id
"""

_HAS_WORK_SQL = """
-- Plain read: anything left that a probe could send, or already on the wire?
-- Two probes, each on the partial index of its states (webhook_deliveries_due, _in_flight).
SELECT EXISTS (SELECT 1 FROM webhook_deliveries
               WHERE subscription_id = $1 AND state IN ('pending', 'retrying'))
       OR EXISTS (SELECT 1 FROM webhook_deliveries
                  WHERE subscription_id = $1 AND state = 'in_flight')
"""

_FAILING_TOO_LONG_SQL = """
-- Plain read; the disable itself goes through Repository.disable_subscription (row lock).
SELECT id, failing_since FROM webhook_subscriptions
WHERE enabled AND failing_since < now() - make_interval(secs => $1)
"""

_PAUSED_SQL = """
-- Plain read for the paused gauge.
SELECT id::text AS id FROM webhook_subscriptions WHERE enabled AND paused_until > now()
"""


# The rows an update of several subscriptions will write, locked in id order first: the order
# in which an ack's counting trigger locks them (sql/007). Locked in any other order, the two
# deadlocked, and one failed after deadlock_timeout (a second's stall).
_LOCK_IN_ID_ORDER_SQL = """
SELECT 1 FROM webhook_subscriptions WHERE id = ANY ($1::uuid[]) ORDER BY id FOR NO KEY UPDATE
"""


async def _update_in_id_order(
    pool: Any, sql: str, subscription_ids: Sequence[uuid.UUID], at: Sequence[float]
) -> None:
    ids = list(subscription_ids)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_LOCK_IN_ID_ORDER_SQL, ids)
        await conn.execute(sql, ids, list(at))


async def record_successes(
    pool: Any, subscription_ids: Sequence[uuid.UUID], at: Sequence[float]
) -> None:
    await _update_in_id_order(pool, _SUCCESS_SQL, subscription_ids, at)


async def record_failures(
    pool: Any, subscription_ids: Sequence[uuid.UUID], at: Sequence[float]
) -> None:
    await _update_in_id_order(pool, _FAILURE_SQL, subscription_ids, at)


async def pause(
    pool: Any,
    subscription_id: str,
    reason: str,
    *,
    pause_seconds: float,
    hold_seconds: float,
    extend: bool,
    max_pause_seconds: float,
    failure_ratio: float | None = None,
) -> float | None:
    """Pause a subscription; the pause's length in seconds, or None when nothing changed
    (disabled, or already paused and ``extend`` is false). ``failure_ratio`` (the breaker's
    trip) travels in the operational event that announces the pause (sql/011)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            operational.MARK_RATIO_SQL, "" if failure_ratio is None else repr(failure_ratio)
        )
        secs = await conn.fetchval(
            _PAUSE_SQL,
            uuid.UUID(subscription_id),
            reason,
            pause_seconds,
            hold_seconds,
            extend,
            max_pause_seconds,
        )
    return None if secs is None else float(secs)


async def resume(pool: Any, subscription_id: str, reason: str) -> bool:
    """Close the breaker of a paused subscription; False when it was not paused."""
    async with pool.acquire() as conn, conn.transaction():
        # The audit trigger reads the reason from this transaction-local setting.
        await conn.execute("SELECT set_config('dispatcher.event_reason', $1, true)", reason)
        resumed = await conn.fetchval(_RESUME_SQL, uuid.UUID(subscription_id))
        if resumed:
            await conn.execute("SELECT pg_notify($1, '')", repository.WORK_CHANNEL)
    return bool(resumed)


async def take_probe_slots(
    pool: Any, *, lease_seconds: float, grace_seconds: float, limit: int
) -> list[str]:
    rows = await pool.fetch(_PROBE_SLOT_SQL, lease_seconds, grace_seconds, limit)
    return [str(r["id"]) for r in rows]


async def has_work(pool: Any, subscription_id: str) -> bool:
    return bool(await pool.fetchval(_HAS_WORK_SQL, uuid.UUID(subscription_id)))


async def failing_too_long(pool: Any, window_seconds: float) -> list[tuple[str, datetime.datetime]]:
    rows = await pool.fetch(_FAILING_TOO_LONG_SQL, window_seconds)
    return [(str(r["id"]), r["failing_since"]) for r in rows]


async def paused_ids(pool: Any) -> list[str]:
    return [str(r["id"]) for r in await pool.fetch(_PAUSED_SQL)]


async def events(pool: Any, subscription_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """A subscription's audit trail, newest first."""
    # Plain read.
    rows = await pool.fetch(
        """
        SELECT kind, reason, source, at FROM webhook_subscription_events
        WHERE subscription_id = $1 ORDER BY id DESC LIMIT $2
        """,
        uuid.UUID(subscription_id),
        limit,
    )
    return [
        {"kind": r["kind"], "reason": r["reason"], "source": r["source"], "at": r["at"].isoformat()}
        for r in rows
    ]


async def status(pool: Any, subscription_id: str) -> dict[str, Any] | None:
    """Health fields of one subscription."""
    # Plain read.
    row = await pool.fetchrow(
        """
        SELECT enabled, disabled_reason, paused_until > now() AS paused, paused_until,
               paused_reason, pause_count, failing_since, last_success_at
        FROM webhook_subscriptions WHERE id = $1
        """,
        uuid.UUID(subscription_id),
    )
    if row is None:
        return None

    def iso(value: Any) -> str | None:
        return None if value is None else str(value.isoformat())

    return {
        "enabled": row["enabled"],
        "disabled_reason": row["disabled_reason"],
        "paused": bool(row["paused"]),
        "paused_until": iso(row["paused_until"]) if row["paused"] else None,
        "paused_reason": row["paused_reason"] if row["paused"] else None,
        "pause_count": row["pause_count"],
        "failing_since": iso(row["failing_since"]),
        "last_success_at": iso(row["last_success_at"]),
    }
