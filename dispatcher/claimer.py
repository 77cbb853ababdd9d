"""The delivery loop: claim due work up to free capacity, send it, and acknowledge results.

The claimer decides what happens after each attempt (delivered, retry later, dead, park);
the sender only classifies. No database connection is held while a request is on the wire:
claims and acks are short statements, and acks are written in batches by ``AckWriter``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

import asyncpg
import structlog

from dispatcher import backoff, config, delivery, errors, limiter, metrics
from dispatcher.db import repository

log = structlog.get_logger("dispatcher.claimer")

DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class AckWriter:
    """Writes attempt results in batches: whatever queued up while the last write ran.

    Results survive database errors (kept and retried); if the process dies first, the lease
    expires and the delivery is sent again (at-least-once)."""

    def __init__(
        self,
        repo: repository.Repository,
        worker: str,
        m: metrics.Metrics,
        *,
        batch: int,
        on_written: Callable[[], None],
    ) -> None:
        self._repo = repo
        self._worker = worker
        self._metrics = m
        self._batch = batch
        self._on_written = on_written
        self._queue: asyncio.Queue[repository.Ack] = asyncio.Queue()
        self.stale = 0

    def put(self, ack: repository.Ack) -> None:
        self._queue.put_nowait(ack)

    def pending(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        """Write until ``close()``'s marker comes through, then return."""
        while True:
            acks = [await self._queue.get()]
            while len(acks) < self._batch and not self._queue.empty():
                acks.append(self._queue.get_nowait())
            closing = any(a is _CLOSE for a in acks)
            await self._write([a for a in acks if a is not _CLOSE])
            if closing and self._queue.empty():
                return

    def close(self) -> None:
        """Ask ``run()`` to return once everything queued so far is written."""
        self._queue.put_nowait(_CLOSE)

    async def _write(self, acks: list[repository.Ack]) -> None:
        if not acks:
            return
        delay = 0.05
        while True:
            try:
                applied = await self._repo.ack(acks, self._worker)
                break
            except DB_ERRORS as exc:
                log.warning(
                    "ack_write_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    results=len(acks),
                    retry_in=delay,
                )
                await asyncio.sleep(delay)  # production back-off between database retries
                delay = min(delay * 2, 5.0)
        stale = len(acks) - len(applied)
        if stale:
            self.stale += stale
            self._metrics.stale_acks.inc(stale)
            for ack in acks:
                if ack.delivery_id not in applied:
                    log.warning(
                        "stale_ack",
                        delivery_id=ack.delivery_id,
                        attempt=ack.attempt,
                        outcome=ack.outcome,
                    )
        self._on_written()


# Marker queued by close(); never written.
_CLOSE = repository.Ack(0, 0, 0, "", None, None, None, 0.0, 0.0, "", None)


class Claimer:
    def __init__(
        self,
        repo: repository.Repository,
        sender: delivery.Sender,
        m: metrics.Metrics,
        settings: config.Settings,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._repo = repo
        self._sender = sender
        self._metrics = m
        self._settings = settings
        self._rand = rand
        self.limiter = limiter.GlobalLimiter(settings.max_in_flight)
        self.acks = AckWriter(
            repo, settings.worker_id, m, batch=settings.ack_batch, on_written=self.wake
        )
        self._wake = asyncio.Event()
        self._claiming = True
        self._tasks: dict[asyncio.Task[None], delivery.Job] = {}
        self._next_due = float("inf")
        self.claimed = 0

    # -- wake-ups --------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def _schedule(self, delay_seconds: float) -> None:
        self._next_due = min(self._next_due, time.monotonic() + delay_seconds)

    # -- main loop -------------------------------------------------------------------------

    async def run(self) -> None:
        s = self._settings
        db_delay = 0.05
        while self._claiming:
            if self.limiter.free() <= 0:
                await self._wait_for_slot()
                continue
            want = min(self.limiter.free(), s.claim_batch)
            self._wake.clear()
            try:
                jobs = await self._repo.claim(s.worker_id, want, s.lease_seconds)
                db_delay = 0.05
            except DB_ERRORS as exc:
                log.warning("claim_failed", error=f"{type(exc).__name__}: {exc}", retry_in=db_delay)
                await self._idle(db_delay)
                db_delay = min(db_delay * 2, 5.0)
                continue
            for job in jobs:
                self._start(job)
            self.claimed += len(jobs)
            if len(jobs) < want and self._claiming:
                await self._idle(self._idle_timeout())

    def _idle_timeout(self) -> float:
        until_due = self._next_due - time.monotonic()
        if until_due <= 0:
            self._next_due = float("inf")
            return 0.0
        return min(self._settings.poll_interval_seconds, until_due)

    async def _idle(self, timeout: float) -> None:
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _wait_for_slot(self) -> None:
        slot = asyncio.ensure_future(self.limiter.wait_for_free())
        woke = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({slot, woke}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            slot.cancel()
            woke.cancel()

    def _start(self, job: delivery.Job) -> None:
        self.limiter.acquire()
        task = asyncio.create_task(self._deliver(job))
        self._tasks[task] = job
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self.limiter.release()
        self._wake.set()

    # -- one delivery ----------------------------------------------------------------------

    async def _deliver(self, job: delivery.Job) -> None:
        label = self._metrics.label(job.subscription_id)
        in_flight = self._metrics.in_flight.labels(subscription=label)
        in_flight.inc()
        started_at = time.time()
        try:
            result = await self._sender.send(job)
        except Exception as exc:  # a sender bug must not strand the delivery
            log.exception("sender_crashed", delivery_id=job.delivery_id)
            result = errors.AttemptResult(
                verdict=errors.Verdict.RETRYABLE,
                outcome=errors.Outcome.OTHER,
                status=None,
                error=f"internal: {type(exc).__name__}",
                duration_seconds=time.time() - started_at,
            )
        finally:
            in_flight.dec()
        await self._conclude(job, result, started_at, label)

    async def _conclude(
        self, job: delivery.Job, result: errors.AttemptResult, started_at: float, label: str
    ) -> None:
        m = self._metrics
        m.attempts.labels(subscription=label, outcome=result.outcome.value).inc()
        m.attempt_duration.labels(subscription=label).observe(result.duration_seconds)
        now = time.time()
        state, delay, error = self._decide(job, result, now)
        if state == "delivered":
            m.deliveries.labels(subscription=label, result="delivered").inc()
            m.delivery_latency.labels(subscription=label).observe(
                max(0.0, now - job.event_created_at)
            )
        elif state == "dead":
            m.deliveries.labels(subscription=label, result="dead").inc()
        elif state == "retrying":
            m.retries_scheduled.labels(subscription=label).inc()
        if result.verdict is errors.Verdict.BLOCKED:
            m.ssrf_blocked.inc()
        log.info(
            "attempt",
            event_id=job.event_id,
            event_type=job.event_type,
            delivery_id=job.delivery_id,
            subscription=job.subscription_id,
            attempt=job.attempt,
            outcome=result.outcome.value,
            status=result.status,
            duration_ms=round(result.duration_seconds * 1000, 2),
            state=state,
            next_retry_in=None if delay is None else round(delay, 3),
            error=error if state != "delivered" else None,
        )
        self.acks.put(
            repository.Ack(
                delivery_id=job.delivery_id,
                lease_token=job.lease_token,
                attempt=job.attempt,
                state=state,
                delay_seconds=delay,
                status=result.status,
                error=error,
                started_at=started_at,
                duration_ms=result.duration_seconds * 1000,
                outcome=result.outcome.value,
                response=result.response_excerpt,
                manual=job.manual,
            )
        )
        if delay is not None:
            self._schedule(delay)
        if result.verdict is errors.Verdict.GONE:
            await self._disable(job, "endpoint answered 410 Gone")

    def _decide(
        self, job: delivery.Job, result: errors.AttemptResult, now: float
    ) -> tuple[str, float | None, str | None]:
        """→ (new state, retry delay or None, error kept on the delivery)."""
        verdict = result.verdict
        if verdict is errors.Verdict.DELIVERED:
            return "delivered", None, None
        if verdict is errors.Verdict.GONE:
            return "parked", None, result.error
        if verdict is errors.Verdict.BLOCKED:
            return "dead", None, result.error
        decision = backoff.decide(
            attempt=job.attempt,
            age_seconds=now - job.event_created_at,
            policy=self._settings.retry,
            permanent=verdict is errors.Verdict.PERMANENT,
            retry_after_seconds=result.retry_after_seconds,
            rand=self._rand,
        )
        if isinstance(decision, backoff.GiveUp):
            return "dead", None, f"{result.error} ({decision.reason})"
        return "retrying", decision.delay_seconds, result.error

    async def _disable(self, job: delivery.Job, reason: str) -> None:
        try:
            if await self._repo.disable_subscription(job.subscription_id, reason):
                self._metrics.subscriptions_disabled.labels(reason="gone").inc()
                self._metrics.subscription_up.labels(
                    subscription=self._metrics.label(job.subscription_id)
                ).set(0)
                log.warning(
                    "subscription_disabled", subscription=job.subscription_id, reason=reason
                )
        except DB_ERRORS as exc:
            # The delivery is already parked by its ack; the next 410 will try again.
            log.error(
                "subscription_disable_failed",
                subscription=job.subscription_id,
                error=f"{type(exc).__name__}: {exc}",
            )

    # -- shutdown --------------------------------------------------------------------------

    def stop_claiming(self) -> None:
        self._claiming = False
        self.wake()

    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, grace_seconds: float) -> int:
        """Wait up to ``grace_seconds`` for requests on the wire, then cancel the rest and
        hand their leases back. Returns how many were released."""
        self.stop_claiming()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_seconds)
        left = dict(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(set(left), timeout=5)
            try:
                await self._repo.release((j.delivery_id, j.lease_token) for j in left.values())
            except DB_ERRORS as exc:
                log.error("lease_release_failed", error=str(exc), leases=len(left))
        return len(left)
