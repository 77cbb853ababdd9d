"""Database-derived gauges, refreshed on an interval by ``GaugeLoop`` (never per scrape).

Queue depth by state, oldest pending age, outbox backlog and subscription state are read from
the shared database, so every replica reports the same database-wide numbers; dashboards and
alerts take ``max by (...)`` over replicas. The queries stay cheap with millions of queued
rows: depth sums the incrementally kept deltas of ``sql/004_metrics.sql`` (one row per
subscription and state), the oldest age is one index probe per subscription with queued work,
and the outbox backlog is counted exactly only up to a cap.

The statements live in ``dispatcher.db.gauges``: they only read, apart from folding the delta
rows (under an advisory lock, one replica at a time). This module turns their snapshot into
gauge values and holds no connection between refreshes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from dispatcher import metrics
from dispatcher.db import gauges as db_gauges
from dispatcher.db import pool as db_pool

log = structlog.get_logger("dispatcher.gauges")

# Fold the delta rows once they outnumber the groups by this much (not on every refresh:
# rewriting every group each time would churn the table for nothing).
COMPACT_SLACK_ROWS = 1_000


@dataclasses.dataclass(frozen=True, slots=True)
class Folded:
    """Gauge values per label value, ``other`` included."""

    depth: dict[tuple[str, str], int]  # (label, state) → deliveries
    oldest_age_seconds: dict[str, float]
    up: dict[str, int]
    # (label, host, description) of every subscription that has a label of its own.
    info: frozenset[tuple[str, str, str]] = frozenset()
    paused: dict[str, int] = dataclasses.field(default_factory=dict)


def fold(snapshot: db_gauges.Snapshot, label: Callable[[str], str]) -> Folded:
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
            info.add((name, sub.host, sub.description[: metrics.INFO_DESCRIPTION_CHARS]))
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


def needs_compaction(snapshot: db_gauges.Snapshot) -> bool:
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

    async def refresh(self) -> db_gauges.Snapshot:
        started = time.perf_counter()
        async with self._pool.acquire() as conn:
            snapshot = await db_gauges.read(conn)
            if needs_compaction(snapshot):
                await db_gauges.compact(conn)
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
            except db_pool.ERRORS as exc:  # lost or restarted database: count, try again
                self._metrics.gauge_refresh_errors.inc()
                log.warning("gauge_refresh_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)


def _items(
    values: dict[tuple[str, str], int],
) -> Iterable[tuple[tuple[str, ...], float]]:
    return ((key, float(n)) for key, n in values.items())
