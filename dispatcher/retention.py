"""Retention: prune delivered deliveries, finished outbox events and old attempt rows.

The statements are in ``dispatcher.db.retention``; this loop runs them in small batches, each
its own short transaction that takes only rows nobody else has locked (SKIP LOCKED), with a
pause between batches, so claims, acks and routing never wait on it for long. Dead, parked
and unfinished deliveries are kept (operators replay dead ones); their attempt rows still age
out after the attempt retention period.

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
from dispatcher.db import retention as db_retention

log = structlog.get_logger("dispatcher.retention")

# Yield between batches so a long prune never monopolises the pool or the disk.
PAUSE_BETWEEN_BATCHES_SECONDS = 0.05


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
            except db_pool.ERRORS as exc:
                log.warning("retention_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), p.interval_seconds)

    async def prune_once(self, stop: asyncio.Event | None = None) -> Pruned:
        """One full pass over everything past its cutoff, batch by batch."""
        p = self._policy
        deliveries = events = attempts = batches = 0
        if p.delivered_seconds > 0:
            cutoff = await db_retention.cutoff(self._pool, p.delivered_seconds)
            cursor = 0
            while stop is None or not stop.is_set():
                outbox = await db_retention.prune_outbox_batch(
                    self._pool, after_id=cursor, cutoff=cutoff, batch=p.batch
                )
                batches += 1
                deliveries += outbox.deliveries
                events += outbox.events
                self._count("deliveries", outbox.deliveries)
                self._count("events", outbox.events)
                if outbox.last_id is None or outbox.all_young:
                    break
                cursor = outbox.last_id
                await asyncio.sleep(PAUSE_BETWEEN_BATCHES_SECONDS)  # be gentle between batches
        if p.attempts_seconds > 0:
            cutoff = await db_retention.cutoff(self._pool, p.attempts_seconds)
            cursor = 0
            while stop is None or not stop.is_set():
                old = await db_retention.prune_attempts_batch(
                    self._pool, after_id=cursor, cutoff=cutoff, batch=p.batch
                )
                batches += 1
                attempts += old.deleted
                self._count("attempts", old.deleted)
                # A slice without anything old means the rest is younger still.
                if old.deleted == 0 or old.seen < p.batch or old.last_id is None:
                    break
                cursor = old.last_id
                await asyncio.sleep(PAUSE_BETWEEN_BATCHES_SECONDS)  # be gentle between batches
        return Pruned(deliveries, events, attempts, batches)

    def _count(self, table: str, n: int) -> None:
        if n:
            self._metrics.retention_pruned.labels(table=table).inc(n)
