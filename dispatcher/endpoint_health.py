"""Endpoint health: a circuit breaker that pauses sick subscriptions, probes them before they
resume, and owns every disable: a subscription whose endpoint answered 410 Gone, and one that
has failed continuously for the configured window.

The claimer reports every attempt to :meth:`Monitor.observe` (synchronous, no I/O) and a 410
to :meth:`Monitor.gone` (which disables at once, in the reporting delivery's slot); the
monitor's loop writes what changed in a few short statements per interval (the statements
live in ``dispatcher.db.health``):

- ``failing_since`` (first failure since the last success) and ``last_success_at`` — the
  auto-disable window is checked against them in the database, so it holds across replicas
  and restarts;
- a breaker trip: ``paused_until``/``probe_at`` (the claim skips paused subscriptions);
- probes: when ``probe_at`` is due, one replica takes the probe slot under a row lock and
  claims one delivery through ``dispatcher_claim_probe``; its success resumes the
  subscription, its failure pauses it again for twice as long (up to a cap).

Every pause, resume, disable and enable is recorded by a trigger in
``webhook_subscription_events`` (sql/005_reliability.sql) with its reason.

This module sends no HTTP itself (probes go through the claimer's ``submit``, passed to
:meth:`Monitor.run`) and never decides a delivery's fate: that stays with the claimer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from dispatcher import config, logs, metrics, model
from dispatcher.db import health as db_health
from dispatcher.db import operational, repository
from dispatcher.db import pool as db_pool

log = structlog.get_logger("dispatcher.health")

# Outcomes that say the endpoint is sick (the breaker counts them). A 4xx means it answered:
# it still counts as "not delivered" for the auto-disable window, but not for the breaker.
SICK_OUTCOMES = frozenset(
    {
        model.Outcome.HTTP_5XX,
        model.Outcome.HTTP_429,
        model.Outcome.TIMEOUT,
        model.Outcome.CONNECT_ERROR,
        model.Outcome.TLS_ERROR,
        model.Outcome.OTHER,
    }
)
# Verdicts that are not health signals (see Monitor.observe).
NOT_HEALTH_SIGNALS = frozenset(
    {model.Verdict.BLOCKED, model.Verdict.GONE, model.Verdict.UNSENDABLE}
)
GONE_REASON = "endpoint answered 410 Gone"
# A healthy subscription's last_success_at is refreshed at most this often.
SUCCESS_REFRESH_SECONDS = 60.0
# After the probe slot is taken, the pause is held at least this long past the lease, so a
# probing replica that dies leaves a pause that runs out by itself (fail open).
PROBE_GRACE_SECONDS = 5.0


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
    trip_ratio: float | None = None


class ProbeRunner(Protocol):
    """What the monitor needs from the claimer: send a probe delivery, wake the claim loop."""

    def submit(self, job: model.Job) -> bool: ...

    def wake(self) -> None: ...


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
        policy: config.EndpointHealthPolicy,
        *,
        worker: str,
        lease_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._repo = repo
        self._metrics = m
        self._policy = policy
        self._worker = worker
        self._lease = lease_seconds
        self._clock = clock
        self._subs: dict[str, _Sub] = {}
        self._probes: dict[int, str] = {}
        self._probe_results: list[ProbeResult] = []
        self._paused_labels: set[str] = set()
        # Subscriptions whose 410 disable failed to write, retried on the next pass.
        self._gone: set[str] = set()
        self._kick = asyncio.Event()

    # -- fed by the claimer (no I/O) -------------------------------------------------------

    def observe(self, job: model.Job, result: model.AttemptResult) -> None:
        ok = result.verdict is model.Verdict.DELIVERED
        probe_of = self._probes.pop(job.delivery_id, None)
        if probe_of is not None:
            self._probe_results.append(ProbeResult(probe_of, ok, None if ok else result.error))
            self._kick.set()
        if result.verdict in NOT_HEALTH_SIGNALS:
            # Configuration (SSRF guard, unsendable) and 410 (see gone()) are not health
            # signals; a probe's answer above still counts, so a paused probe is not stranded.
            return
        now = self._clock()
        sub = self._subs.get(job.subscription_id)
        if sub is None:
            # Not setdefault(): that built a _Sub (and its deque) on every attempt.
            sub = self._subs[job.subscription_id] = _Sub()
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

    async def gone(self, job: model.Job) -> None:
        """The endpoint answered 410: disable its subscription now (its delivery is already
        parked by its ack). A failed write is retried by the loop."""
        try:
            await self._disable(job.subscription_id, GONE_REASON, kind=operational.GONE)
        except db_pool.ERRORS as exc:
            log.error(
                "subscription_disable_failed",
                subscription=job.subscription_id,
                error=logs.error_text(exc),
            )
            self._gone.add(job.subscription_id)
            self._kick.set()

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
            sub.trip_ratio = failed / total
            sub.window.clear()  # a fresh window after the pause
            self._kick.set()

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, probes: ProbeRunner) -> None:
        delay = self._policy.interval_seconds
        while not stop.is_set():
            try:
                await self.tick(probes)
                delay = self._policy.interval_seconds
            except db_pool.ERRORS as exc:
                log.warning("health_check_failed", error=logs.error_text(exc))
                delay = min(delay * 2, 10.0)
            self._kick.clear()
            waiter = asyncio.ensure_future(self._kick.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, timeout=delay, return_when="FIRST_COMPLETED")
            finally:
                waiter.cancel()
                stopper.cancel()

    async def tick(self, probes: ProbeRunner) -> None:
        """One pass: disable gone endpoints, write outcomes, apply trips and probe results,
        disable failing ones, probe."""
        await self._disable_gone()
        await self._flush_outcomes()
        await self._apply_trips()
        await self._apply_probe_results(probes)
        await self._disable_failing()
        await self._start_probes(probes)
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
            await db_health.record_successes(self._pool, ok_ids, ok_at)
        if bad_ids:
            await db_health.record_failures(self._pool, bad_ids, bad_at)
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
            secs = await db_health.pause(
                self._pool,
                sid,
                reason,
                pause_seconds=p.pause_seconds,
                hold_seconds=self._lease + PROBE_GRACE_SECONDS,
                extend=False,
                max_pause_seconds=p.max_pause_seconds,
                failure_ratio=sub.trip_ratio,
            )
            sub.trip_reason = None
            sub.trip_ratio = None
            if secs is not None:
                self._paused(sid, reason, secs)

    async def _apply_probe_results(self, probes: ProbeRunner) -> None:
        p = self._policy
        results, self._probe_results = self._probe_results, []
        for i, r in enumerate(results):
            try:
                if r.ok:
                    await self._resume(r.subscription_id, "probe delivered", probes)
                else:
                    reason = f"probe failed: {r.error}"
                    secs = await db_health.pause(
                        self._pool,
                        r.subscription_id,
                        reason,
                        pause_seconds=p.pause_seconds,
                        hold_seconds=self._lease + PROBE_GRACE_SECONDS,
                        extend=True,
                        max_pause_seconds=p.max_pause_seconds,
                    )
                    if secs is not None:
                        self._metrics.health_events.labels(event="probe_failed").inc()
                        self._paused(r.subscription_id, reason, secs)
            except db_pool.ERRORS:
                self._probe_results[:0] = results[i:]  # keep what is not applied yet
                raise

    async def _resume(self, subscription_id: str, reason: str, probes: ProbeRunner) -> None:
        if await db_health.resume(self._pool, subscription_id, reason):
            self._metrics.health_events.labels(event="resumed").inc()
            log.info("subscription_resumed", subscription=subscription_id, reason=reason)
            probes.wake()

    def _paused(self, subscription_id: str, reason: str, seconds: float) -> None:
        self._metrics.health_events.labels(event="paused").inc()
        log.warning(
            "subscription_paused",
            subscription=subscription_id,
            reason=reason,
            pause_seconds=round(seconds, 3),
        )

    async def _disable_gone(self) -> None:
        for sid in sorted(self._gone):
            # The delivery is already parked by its ack; a failed write is retried next pass.
            await self._disable(sid, GONE_REASON, kind=operational.GONE)
            self._gone.discard(sid)

    async def _disable_failing(self) -> None:
        window = self._policy.disable_after_seconds
        if window <= 0:
            return
        for sid, failing_since in await db_health.failing_too_long(self._pool, window):
            reason = (
                f"failing continuously since {failing_since.isoformat()} (more than {window:g}s)"
            )
            await self._disable(sid, reason, kind=operational.FAILING)

    async def _disable(self, subscription_id: str, reason: str, *, kind: str) -> None:
        """The one place a subscription is disabled automatically; ``kind`` is the metric's
        ``reason`` label (gone | failing)."""
        if not await self._repo.disable_subscription(subscription_id, reason, kind=kind):
            return  # already disabled (another replica, or an operator)
        self._metrics.subscriptions_disabled.labels(reason=kind).inc()
        if kind == operational.FAILING:
            self._metrics.health_events.labels(event="disabled").inc()
        self._metrics.subscription_up.labels(subscription=self._metrics.label(subscription_id)).set(
            0
        )
        log.warning("subscription_disabled", subscription=subscription_id, reason=reason)

    async def _start_probes(self, probes: ProbeRunner) -> None:
        slots = await db_health.take_probe_slots(
            self._pool, lease_seconds=self._lease, grace_seconds=PROBE_GRACE_SECONDS, limit=10
        )
        for sid in slots:
            jobs = await self._repo.claim_probe(self._worker, sid, self._lease)
            if not jobs:
                if not await db_health.has_work(self._pool, sid):
                    await self._resume(sid, "nothing left to probe", probes)
                continue
            job = jobs[0]
            self._probes[job.delivery_id] = job.subscription_id
            if not probes.submit(job):
                # No free slot (or draining): hand the lease back; the next pass retries.
                self._probes.pop(job.delivery_id, None)
                await self._repo.release([(job.delivery_id, job.lease_token)])
                continue
            log.info("subscription_probe", subscription=job.subscription_id)

    async def _refresh_paused_gauge(self) -> None:
        labels = {self._metrics.label(sid) for sid in await db_health.paused_ids(self._pool)}
        for label in self._paused_labels - labels:
            self._metrics.subscription_paused.labels(subscription=label).set(0)
        for label in labels:
            self._metrics.subscription_paused.labels(subscription=label).set(1)
        self._paused_labels = labels
