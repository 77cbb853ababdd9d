"""Retention: prune delivered deliveries, finished outbox events and old attempt rows.

Works in small batches, each its own short transaction that takes only rows nobody else has
locked (SKIP LOCKED), with a pause between batches, so claims, acks and routing never wait on
it for long. Dead, parked and unfinished deliveries are kept (operators replay dead ones);
their attempt rows still age out after the attempt retention period.

An event's outbox row goes once all its deliveries are gone, which also frees its
``event_id`` for reuse: the idempotency window of producers equals the retention period.

This module must not touch anything younger than its cutoffs, and sends no HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import structlog

from dispatcher import config, metrics
from dispatcher.db import pool as db_pool

log = structlog.get_logger("dispatcher.retention")

DB_ERRORS = db_pool.ERRORS
# Yield between batches so a long prune never monopolises the pool or the disk.
PAUSE_BETWEEN_BATCHES_SECONDS = 0.05

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
class Pruned:
    deliveries: int = 0
    events: int = 0
    attempts: int = 0
    batches: int = 0


class Pruner:
    def __init__(self, pool: Any, m: metrics.Metrics, policy: config.RetentionPolicy) -> None:
        self._pool = pool
        self._metrics = m
        self._policy = policy

    async def run(self, stop: asyncio.Event) -> None:
        p = self._policy
        if p.delivered_seconds <= 0 and p.attempts_seconds <= 0:
            return
        while not stop.is_set():
            try:
                got = await self.prune_once(stop)
                if got.deliveries or got.events or got.attempts:
                    log.info(
                        "retention_pruned",
                        deliveries=got.deliveries,
                        events=got.events,
                        attempts=got.attempts,
                        batches=got.batches,
                    )
            except DB_ERRORS as exc:
                log.warning("retention_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), p.interval_seconds)

    async def prune_once(self, stop: asyncio.Event | None = None) -> Pruned:
        """One full pass over everything past its cutoff, batch by batch."""
        p = self._policy
        deliveries = events = attempts = batches = 0
        if p.delivered_seconds > 0:
            cutoff = await self._cutoff(p.delivered_seconds)
            cursor = 0
            while stop is None or not stop.is_set():
                row = await self._pool.fetchrow(_OUTBOX_BATCH_SQL, cursor, cutoff, p.batch)
                batches += 1
                deliveries += row["deliveries"]
                events += row["events"]
                self._count("deliveries", row["deliveries"])
                self._count("events", row["events"])
                if row["last_id"] is None or row["all_young"]:
                    break
                cursor = row["last_id"]
                await asyncio.sleep(PAUSE_BETWEEN_BATCHES_SECONDS)  # be gentle between batches
        if p.attempts_seconds > 0:
            cutoff = await self._cutoff(p.attempts_seconds)
            cursor = 0
            while stop is None or not stop.is_set():
                row = await self._pool.fetchrow(_ATTEMPTS_BATCH_SQL, cutoff, p.batch, cursor)
                batches += 1
                attempts += row["deleted"]
                self._count("attempts", row["deleted"])
                # A slice without anything old means the rest is younger still.
                if row["deleted"] == 0 or row["seen"] < p.batch:
                    break
                cursor = row["last_id"]
                await asyncio.sleep(PAUSE_BETWEEN_BATCHES_SECONDS)  # be gentle between batches
        return Pruned(deliveries, events, attempts, batches)

    async def _cutoff(self, seconds: float) -> Any:
        # The database clock, like every other timestamp in the schema.
        return await self._pool.fetchval("SELECT now() - make_interval(secs => $1)", float(seconds))

    def _count(self, table: str, n: int) -> None:
        if n:
            self._metrics.retention_pruned.labels(table=table).inc(n)
