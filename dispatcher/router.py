"""Turns outbox rows into deliveries, and hands expired leases back to the queue.

Both loops are wake-up driven with a poll as the safety net; neither sends HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from dispatcher import logs, metrics, model, tracing
from dispatcher.db import pool as db_pool
from dispatcher.db import repository

log = structlog.get_logger("dispatcher.router")


class Router:
    def __init__(
        self,
        repo: repository.Repository,
        m: metrics.Metrics,
        *,
        batch: int,
        poll_interval_seconds: float,
        on_routed: Callable[[], None],
        tracer: tracing.Tracer = tracing.OFF,
    ) -> None:
        self._repo = repo
        self._metrics = m
        self._tracer = tracer
        self._batch = batch
        self._poll = poll_interval_seconds
        self._on_routed = on_routed
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            try:
                while not stop.is_set():
                    started_ns = time.time_ns()
                    stats = await self._repo.route(self._batch)
                    if stats.events and self._tracer.enabled:
                        self._trace(started_ns, stats)
                    self._count(stats)
                    if stats.deliveries:
                        self._on_routed()
                    if stats.events < self._batch:
                        break
            except db_pool.ERRORS as exc:
                log.warning("route_failed", error=logs.error_text(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    def _trace(self, started_ns: int, stats: model.RouteStats) -> None:
        counts = {
            "events": stats.events,
            "routed": stats.routed,
            "unmatched": stats.unmatched,
            "unknown_subscription": stats.unknown_subscription,
            "deliveries": stats.deliveries,
        }
        self._tracer.routed(started_ns, time.time_ns(), counts, stats.traced)

    def _count(self, stats: model.RouteStats) -> None:
        routed = self._metrics.events_routed
        if stats.routed:
            routed.labels(result="routed").inc(stats.routed)
        if stats.unmatched:
            routed.labels(result="unmatched").inc(stats.unmatched)
            log.info("events_unmatched", count=stats.unmatched)
        if stats.unknown_subscription:
            routed.labels(result="unknown_subscription").inc(stats.unknown_subscription)
            log.warning("events_for_unknown_subscription", count=stats.unknown_subscription)


class Reaper:
    """Returns expired leases (a dead or stalled worker's claims) to the queue."""

    def __init__(
        self,
        repo: repository.Repository,
        m: metrics.Metrics,
        *,
        max_attempts: int,
        interval_seconds: float,
        on_requeued: Callable[[], None],
    ) -> None:
        self._repo = repo
        self._metrics = m
        self._max_attempts = max_attempts
        self._interval = interval_seconds
        self._on_requeued = on_requeued

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                got = await self._repo.reclaim_expired(self._max_attempts)
                if got.requeued or got.dead:
                    self._metrics.leases_reclaimed.inc(got.requeued + got.dead)
                    log.warning("leases_reclaimed", requeued=got.requeued, dead=got.dead)
                    self._on_requeued()
            except db_pool.ERRORS as exc:
                log.warning("reclaim_failed", error=logs.error_text(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
