"""Endpoint health: a circuit breaker that pauses sick subscriptions, probes them before they
resume, and disables the ones that have failed continuously for the configured window.

The claimer reports every attempt to :meth:`Monitor.observe` (synchronous, no I/O); the
monitor's loop writes what changed in a few short statements per interval:

- ``failing_since`` (first failure since the last success) and ``last_success_at`` — the
  auto-disable window is checked against them in the database, so it holds across replicas
  and restarts;
- a breaker trip: ``paused_until``/``probe_at`` (the claim skips paused subscriptions);
- probes: when ``probe_at`` is due, one replica takes the probe slot under a row lock and
  claims one delivery through ``dispatcher_claim_probe``; its success resumes the
  subscription, its failure pauses it again for twice as long (up to a cap).

Every pause, resume, disable and enable is recorded by a trigger in
``webhook_subscription_events`` (sql/005_reliability.sql) with its reason.

This module sends no HTTP itself (probes go through the claimer and the sender) and never
decides a delivery's fate: that stays with the claimer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog

from dispatcher import config, delivery, errors, metrics
from dispatcher.db import pool as db_pool
from dispatcher.db import repository

log = structlog.get_logger("dispatcher.health")

DB_ERRORS = db_pool.ERRORS

# Outcomes that say the endpoint is sick (the breaker counts them). A 4xx means it answered:
# it still counts as "not delivered" for the auto-disable window, but not for the breaker.
SICK_OUTCOMES = frozenset(
    {
        errors.Outcome.HTTP_5XX,
        errors.Outcome.HTTP_429,
        errors.Outcome.TIMEOUT,
        errors.Outcome.CONNECT_ERROR,
        errors.Outcome.TLS_ERROR,
        errors.Outcome.OTHER,
    }
)
# A healthy subscription's last_success_at is refreshed at most this often.
SUCCESS_REFRESH_SECONDS = 60.0
# After the probe slot is taken, the pause is held at least this long past the lease, so a
# probing replica that dies leaves a pause that runs out by itself (fail open).
PROBE_GRACE_SECONDS = 5.0

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
SELECT EXISTS (SELECT 1 FROM webhook_deliveries
               WHERE subscription_id = $1 AND state IN ('pending', 'retrying', 'in_flight'))
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


@dataclasses.dataclass
class _Window:
    """Attempt counts over the last ``span`` seconds in one-second buckets with running
    totals: O(1) per attempt and bounded memory, however high the rate."""

    buckets: collections.deque[list[int]] = dataclasses.field(default_factory=collections.deque)
    total: int = 0
    failed: int = 0

    def add(self, now: float, *, failed: bool, span_seconds: float) -> None:
        second = int(now)
        if self.buckets and self.buckets[-1][0] == second:
            bucket = self.buckets[-1]
            bucket[1] += 1
            bucket[2] += failed
        else:
            self.buckets.append([second, 1, int(failed)])
        self.total += 1
        self.failed += failed
        horizon = now - span_seconds
        while self.buckets and self.buckets[0][0] + 1 <= horizon:
            _second, total, bad = self.buckets.popleft()
            self.total -= total
            self.failed -= bad

    def clear(self) -> None:
        self.buckets.clear()
        self.total = self.failed = 0


@dataclasses.dataclass
class _Sub:
    window: _Window = dataclasses.field(default_factory=_Window)
    first_failure: float | None = None
    last_success: float | None = None
    failure_flushed: bool = False
    success_flushed_at: float = float("-inf")
    success_due: bool = False
    trip_reason: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeResult:
    subscription_id: str
    ok: bool
    error: str | None


class Monitor:
    """Per-process health bookkeeping plus the loop that applies it to the database."""

    def __init__(
        self,
        pool: Any,
        repo: repository.Repository,
        m: metrics.Metrics,
        policy: config.HealthPolicy,
        *,
        worker: str,
        lease_seconds: float,
        submit: Callable[[delivery.Job], bool],
        wake: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._repo = repo
        self._metrics = m
        self._policy = policy
        self._worker = worker
        self._lease = lease_seconds
        self._submit = submit
        self._wake = wake
        self._clock = clock
        self._subs: dict[str, _Sub] = {}
        self._probes: dict[int, str] = {}
        self._probe_results: list[ProbeResult] = []
        self._paused_labels: set[str] = set()
        self._kick = asyncio.Event()

    # -- fed by the claimer (no I/O) -------------------------------------------------------

    def observe(self, job: delivery.Job, result: errors.AttemptResult) -> None:
        ok = result.verdict is errors.Verdict.DELIVERED
        probe_of = self._probes.pop(job.delivery_id, None)
        if probe_of is not None:
            self._probe_results.append(ProbeResult(probe_of, ok, None if ok else result.error))
            self._kick.set()
        if result.verdict in (
            errors.Verdict.BLOCKED,
            errors.Verdict.GONE,
            errors.Verdict.UNSENDABLE,
        ):
            return  # configuration (SSRF, unsendable) and 410 are handled elsewhere
        now = self._clock()
        sub = self._subs.setdefault(job.subscription_id, _Sub())
        if probe_of is not None and ok:
            # Recovered: judge what follows on its own, not on failures from before the pause.
            sub.window.clear()
            sub.trip_reason = None
        if ok:
            sub.last_success = now
            if sub.first_failure is not None or now - sub.success_flushed_at > (
                SUCCESS_REFRESH_SECONDS
            ):
                sub.success_due = True
            sub.first_failure = None
            sub.failure_flushed = False
        elif sub.first_failure is None:
            sub.first_failure = now
        self._note_for_breaker(sub, now, sick=result.outcome in SICK_OUTCOMES)

    def _note_for_breaker(self, sub: _Sub, now: float, *, sick: bool) -> None:
        p = self._policy
        if p.breaker_failure_ratio <= 0:
            return
        sub.window.add(now, failed=sick, span_seconds=p.breaker_window_seconds)
        total, failed = sub.window.total, sub.window.failed
        if total >= p.breaker_min_attempts and failed >= p.breaker_failure_ratio * total:
            sub.trip_reason = (
                f"circuit breaker: {failed} of {total} attempts failed in the last "
                f"{p.breaker_window_seconds:g}s"
            )
            sub.window.clear()  # a fresh window after the pause
            self._kick.set()

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        delay = self._policy.interval_seconds
        while not stop.is_set():
            try:
                await self.tick()
                delay = self._policy.interval_seconds
            except DB_ERRORS as exc:
                log.warning("health_check_failed", error=f"{type(exc).__name__}: {exc}")
                delay = min(delay * 2, 10.0)
            self._kick.clear()
            waiter = asyncio.ensure_future(self._kick.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, timeout=delay, return_when="FIRST_COMPLETED")
            finally:
                waiter.cancel()
                stopper.cancel()

    async def tick(self) -> None:
        """One pass: write outcomes, apply trips and probe results, disable, probe."""
        await self._flush_outcomes()
        await self._apply_trips()
        await self._apply_probe_results()
        await self._disable_failing()
        await self._start_probes()
        await self._refresh_paused_gauge()

    async def _flush_outcomes(self) -> None:
        now = self._clock()
        ok_ids, ok_at, bad_ids, bad_at = [], [], [], []
        for sid, sub in self._subs.items():
            if sub.success_due and sub.last_success is not None:
                ok_ids.append(uuid.UUID(sid))
                ok_at.append(sub.last_success)
            if sub.first_failure is not None and not sub.failure_flushed:
                bad_ids.append(uuid.UUID(sid))
                bad_at.append(sub.first_failure)
        if ok_ids:
            await self._pool.execute(_SUCCESS_SQL, ok_ids, ok_at)
        if bad_ids:
            await self._pool.execute(_FAILURE_SQL, bad_ids, bad_at)
        # Only after the writes succeeded: a failed write is retried on the next pass.
        for sid, sub in self._subs.items():
            if uuid.UUID(sid) in ok_ids:
                sub.success_due = False
                sub.success_flushed_at = now
            if sub.first_failure is not None:
                sub.failure_flushed = True

    async def _apply_trips(self) -> None:
        p = self._policy
        for sid, sub in list(self._subs.items()):
            reason = sub.trip_reason
            if reason is None:
                continue
            secs = await self._pool.fetchval(
                _PAUSE_SQL,
                uuid.UUID(sid),
                reason,
                p.pause_seconds,
                self._lease + PROBE_GRACE_SECONDS,
                False,
                p.max_pause_seconds,
            )
            sub.trip_reason = None
            if secs is not None:
                self._paused(sid, reason, float(secs))

    async def _apply_probe_results(self) -> None:
        p = self._policy
        results, self._probe_results = self._probe_results, []
        for i, r in enumerate(results):
            try:
                if r.ok:
                    await self._resume(r.subscription_id, "probe delivered")
                else:
                    reason = f"probe failed: {r.error}"
                    secs = await self._pool.fetchval(
                        _PAUSE_SQL,
                        uuid.UUID(r.subscription_id),
                        reason,
                        p.pause_seconds,
                        self._lease + PROBE_GRACE_SECONDS,
                        True,
                        p.max_pause_seconds,
                    )
                    if secs is not None:
                        self._metrics.health_events.labels(event="probe_failed").inc()
                        self._paused(r.subscription_id, reason, float(secs))
            except DB_ERRORS:
                self._probe_results[:0] = results[i:]  # keep what is not applied yet
                raise

    async def _resume(self, subscription_id: str, reason: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # The audit trigger reads the reason from this transaction-local setting.
            await conn.execute("SELECT set_config('dispatcher.event_reason', $1, true)", reason)
            resumed = await conn.fetchval(_RESUME_SQL, uuid.UUID(subscription_id))
            if resumed:
                await conn.execute("SELECT pg_notify($1, '')", repository.WORK_CHANNEL)
        if resumed:
            self._metrics.health_events.labels(event="resumed").inc()
            log.info("subscription_resumed", subscription=subscription_id, reason=reason)
            self._wake()

    def _paused(self, subscription_id: str, reason: str, seconds: float) -> None:
        self._metrics.health_events.labels(event="paused").inc()
        log.warning(
            "subscription_paused",
            subscription=subscription_id,
            reason=reason,
            pause_seconds=round(seconds, 3),
        )

    async def _disable_failing(self) -> None:
        window = self._policy.disable_after_seconds
        if window <= 0:
            return
        for row in await self._pool.fetch(_FAILING_TOO_LONG_SQL, window):
            sid = str(row["id"])
            reason = (
                f"failing continuously since {row['failing_since'].isoformat()} "
                f"(more than {window:g}s)"
            )
            if await self._repo.disable_subscription(sid, reason):
                self._metrics.subscriptions_disabled.labels(reason="failing").inc()
                self._metrics.health_events.labels(event="disabled").inc()
                self._metrics.subscription_up.labels(subscription=self._metrics.label(sid)).set(0)
                log.warning("subscription_disabled", subscription=sid, reason=reason)

    async def _start_probes(self) -> None:
        slots = await self._pool.fetch(_PROBE_SLOT_SQL, self._lease, PROBE_GRACE_SECONDS, 10)
        for row in slots:
            sid = row["id"]
            jobs = await self._repo.claim_probe(self._worker, str(sid), self._lease)
            if not jobs:
                if not await self._pool.fetchval(_HAS_WORK_SQL, sid):
                    await self._resume(str(sid), "nothing left to probe")
                continue
            job = jobs[0]
            self._probes[job.delivery_id] = job.subscription_id
            if not self._submit(job):
                # No free slot (or draining): hand the lease back; the next pass retries.
                self._probes.pop(job.delivery_id, None)
                await self._repo.release([(job.delivery_id, job.lease_token)])
                continue
            log.info("subscription_probe", subscription=job.subscription_id)

    async def _refresh_paused_gauge(self) -> None:
        rows = await self._pool.fetch(_PAUSED_SQL)
        labels = {self._metrics.label(r["id"]) for r in rows}
        for label in self._paused_labels - labels:
            self._metrics.subscription_paused.labels(subscription=label).set(0)
        for label in labels:
            self._metrics.subscription_paused.labels(subscription=label).set(1)
        self._paused_labels = labels


async def events(pool: Any, subscription_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """A subscription's audit trail, newest first (for the CLI and the admin API)."""
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
    """Health fields of one subscription (for the CLI and the admin API)."""
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
