"""Retention statements: one batch of old outbox events with their delivered deliveries, one
batch of old attempt rows, and the cutoff on the database clock.

Each batch is one short statement that takes only rows nobody else has locked; the pacing,
the metrics and the loop are ``dispatcher.retention``. Nothing younger than the cutoff is
touched.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

_OUTBOX_BATCH_SQL = """
-- The next slice of the oldest routed events (primary-key order, keyset cursor), locked so a
-- replay or a concurrent pruner skips them; then, within the slice only: delete delivered
-- deliveries finished before the cutoff, and the events left without any delivery. Events
-- still holding dead or unfinished deliveries stay (the cursor moves past them).
WITH slice AS (
    SELECT id, routed_at
    FROM webhook_outbox
    WHERE id > $1 AND routed_at IS NOT NULL
    ORDER BY id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), gone_deliveries AS (
    DELETE FROM webhook_deliveries d
    USING slice
    WHERE d.outbox_id = slice.id AND d.state = 'delivered' AND d.finished_at < $2
    RETURNING d.id, d.outbox_id
), gone_events AS (
    DELETE FROM webhook_outbox o
    USING slice
    WHERE o.id = slice.id AND slice.routed_at < $2
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                      WHERE d.outbox_id = o.id
                        AND d.id NOT IN (SELECT id FROM gone_deliveries))
    RETURNING o.id
)
SELECT (SELECT max(id) FROM slice) AS last_id,
       (SELECT min(routed_at) >= $2 FROM slice) AS all_young,
       (SELECT count(*) FROM gone_deliveries) AS deliveries,
       (SELECT count(*) FROM gone_events) AS events
"""

_ATTEMPTS_BATCH_SQL = """
-- The next slice of attempt rows by id (keyset cursor; ids grow with time, so the old rows
-- come first), deleting those older than the cutoff. Acks only ever insert here, so nothing
-- waits on it.
WITH oldest AS (
    SELECT id, started_at FROM webhook_attempts WHERE id > $3 ORDER BY id LIMIT $2
), gone AS (
    DELETE FROM webhook_attempts a
    USING oldest
    WHERE a.id = oldest.id AND oldest.started_at < $1
    RETURNING a.id
)
SELECT (SELECT count(*) FROM gone) AS deleted, (SELECT count(*) FROM oldest) AS seen,
       (SELECT max(id) FROM oldest) AS last_id
"""


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxBatch:
    last_id: int | None  # the slice's last event id (None: nothing left to look at)
    all_young: bool  # every event of the slice is younger than the cutoff
    deliveries: int
    events: int


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptsBatch:
    deleted: int
    seen: int
    last_id: int | None


async def cutoff(pool: Any, seconds: float) -> datetime.datetime:
    """``now() - seconds`` on the database clock, like every other timestamp in the schema."""
    value: datetime.datetime = await pool.fetchval(
        "SELECT now() - make_interval(secs => $1)", float(seconds)
    )
    return value


async def prune_outbox_batch(
    pool: Any, *, after_id: int, cutoff: datetime.datetime, batch: int
) -> OutboxBatch:
    row = await pool.fetchrow(_OUTBOX_BATCH_SQL, after_id, cutoff, batch)
    return OutboxBatch(
        last_id=row["last_id"],
        all_young=bool(row["all_young"]),
        deliveries=row["deliveries"],
        events=row["events"],
    )


async def prune_attempts_batch(
    pool: Any, *, after_id: int, cutoff: datetime.datetime, batch: int
) -> AttemptsBatch:
    row = await pool.fetchrow(_ATTEMPTS_BATCH_SQL, cutoff, batch, after_id)
    return AttemptsBatch(deleted=row["deleted"], seen=row["seen"], last_id=row["last_id"])
