"""The delivery loop: claim due work up to free capacity, send it, and acknowledge results.

The claimer decides what happens after each attempt (delivered, retry later, dead, park);
the sender only classifies. No database connection is held while a request is on the wire:
claims and acks are short statements, and acks are written in batches by ``AckWriter``.

Capacity returns on events, not timers. New work wakes the claim loop (NOTIFY, the poll,
a retry coming due). A finished request frees its slot; its result is written with the next
claim in the same round trip (``Repository.complete_and_claim``) when more work is known to
wait: the last claim came back full, or the request's subscription was held back by its own
max_in_flight (``Job.capped``), or new work arrived while every slot was busy. Slots are
reserved in the process-wide limiter before a claim asks for them, so the two paths that
claim never overcommit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import asyncpg
import structlog

from dispatcher import backoff, config, limiter, logs, metrics, model, sender, tracing
from dispatcher.db import pool as db_pool
from dispatcher.db import repository

log = structlog.get_logger("dispatcher.claimer")

# Errors about a batch's content, not the database's availability.
BAD_ROW_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)


# Consecutive failed claims after which readiness reports the process unready (the retry
# delay doubles from 50 ms, so about 1.5 s of failing). The database may still answer pings:
# a row or a function that breaks every claim must not look healthy.
CLAIM_FAILURES_UNREADY = 5


def _no_refill() -> int:
    return 0


def _nothing() -> None:
    return None


class HealthReport(Protocol):
    """Where the claimer reports attempts: the endpoint health monitor, which owns what
    follows for the subscription (pause, probe, disable)."""

    def observe(self, job: model.Job, result: model.AttemptResult) -> None: ...

    async def gone(self, job: model.Job) -> None: ...


def decide(
    result: model.AttemptResult,
    *,
    attempt: int,
    age_seconds: float,
    policy: config.RetryPolicy,
    rand: Callable[[], float] = random.random,
) -> tuple[model.DeliveryState, float | None, str | None]:
    """What one attempt's result makes of its delivery: (new state, retry delay or None,
    error kept on the delivery). Pure: the verdict table plus the retry policy."""
    verdict = result.verdict
    if verdict is model.Verdict.DELIVERED:
        return model.DeliveryState.DELIVERED, None, None
    if verdict is model.Verdict.GONE:
        return model.DeliveryState.PARKED, None, result.error
    if verdict is model.Verdict.BLOCKED:
        return model.DeliveryState.DEAD, None, result.error
    if verdict is model.Verdict.UNSENDABLE:
        # No retry can fix it until someone changes the configuration.
        return model.DeliveryState.PARKED, None, result.error
    decision = backoff.decide(
        attempt=attempt,
        age_seconds=age_seconds,
        policy=policy,
        permanent=verdict is model.Verdict.PERMANENT,
        retry_after_seconds=result.retry_after_seconds,
        rand=rand,
    )
    if isinstance(decision, backoff.GiveUp):
        return model.DeliveryState.DEAD, None, f"{result.error} ({decision.reason})"
    return model.DeliveryState.RETRYING, decision.delay_seconds, result.error


class AckWriter:
    """Writes attempt results in batches: whatever queued up while the last write ran.

    Before each write it asks ``refill`` how many slots to claim for in the same round trip
    (already reserved by the caller; 0 = write only) and hands what it claimed, with the
    number of slots it reserved, to ``on_claimed``. Results survive database errors (kept and
    retried); if the process dies first, the lease expires and the delivery is sent again
    (at-least-once)."""

    def __init__(
        self,
        repo: repository.Repository,
        worker: str,
        m: metrics.Metrics,
        *,
        batch: int,
        on_written: Callable[[], None],
        refill: Callable[[], int] = _no_refill,
        on_claimed: Callable[[list[model.Job], int], None] | None = None,
        on_claim_failed: Callable[[], None] = _nothing,
        lease_seconds: float = 60.0,
        ahead: int = 0,
    ) -> None:
        self._repo = repo
        self._worker = worker
        self._metrics = m
        self._batch = batch
        self._on_written = on_written
        self._refill = refill
        self._on_claimed = on_claimed
        self._on_claim_failed = on_claim_failed
        self._lease_seconds = lease_seconds
        self._ahead = ahead
        # A list and an event rather than an asyncio.Queue: a put per delivery is an append
        # (Queue.put_nowait and get_nowait were ~2 us a delivery, bench profile).
        self._queue: list[model.Ack] = []
        self._queued = asyncio.Event()
        self._closing = False
        self.stale = 0

    def put(self, ack: model.Ack) -> None:
        self._queue.append(ack)
        self._queued.set()

    def pending(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Write whatever queued up while the last write ran, until ``close()`` was called
        and everything queued is written; then return."""
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._queued.clear()
                await self._queued.wait()
                continue
            acks = self._queue[: self._batch]
            del self._queue[: self._batch]
            want = self._refill() if self._on_claimed is not None else 0
            if want > 0:
                await self._write_and_claim(acks, want)
            else:
                await self._write(acks)

    def close(self) -> None:
        """Ask ``run()`` to return once everything queued is written."""
        self._closing = True
        self._queued.set()

    async def _write_and_claim(self, acks: list[model.Ack], want: int) -> None:
        assert self._on_claimed is not None
        try:
            applied, jobs = await self._repo.complete_and_claim(
                acks, self._worker, want, self._lease_seconds, self._ahead
            )
        except (*BAD_ROW_ERRORS, *db_pool.ERRORS) as exc:
            # One transaction: neither part happened. Give the slots back and write the
            # results the careful way (split around bad rows, retried through outages).
            self._on_claimed([], want)
            self._on_claim_failed()
            if not isinstance(exc, BAD_ROW_ERRORS):
                log.warning("ack_write_failed", error=logs.error_text(exc), results=len(acks))
            await self._write(acks)
            return
        self._on_claimed(jobs, want)
        self._applied(acks, applied)

    async def _write(self, acks: list[model.Ack]) -> None:
        if not acks:
            return
        delay = 0.05
        while True:
            try:
                applied = await self._repo.ack(acks, self._worker)
                break
            except BAD_ROW_ERRORS as exc:
                # Retrying cannot help a batch the database rejects for its content: split it
                # so one bad row cannot hold back the others. A single bad row is dropped (its
                # lease expires and the delivery is attempted again: nothing is lost).
                if len(acks) == 1:
                    log.error(
                        "ack_rejected",
                        delivery_id=acks[0].delivery_id,
                        error=logs.error_text(exc),
                    )
                    return
                half = len(acks) // 2
                await self._write(acks[:half])
                await self._write(acks[half:])
                return
            except db_pool.ERRORS as exc:
                log.warning(
                    "ack_write_failed",
                    error=logs.error_text(exc),
                    results=len(acks),
                    retry_in=delay,
                )
                await asyncio.sleep(delay)  # production back-off between database retries
                delay = min(delay * 2, 5.0)
        self._applied(acks, applied)

    def _applied(self, acks: list[model.Ack], applied: set[int]) -> None:
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


class _Children:
    """One subscription label's metric children, looked up once instead of per attempt.
    Safe to keep: nothing removes these series (only the database gauges are pruned)."""

    def __init__(self, m: metrics.Metrics, label: str) -> None:
        self._m = m
        self.label = label
        self.on_wire = m.on_wire(label)
        self.attempt_duration = m.attempt_duration.labels(subscription=label)
        self.delivery_latency = m.delivery_latency.labels(subscription=label)
        self.delivered = m.deliveries.labels(subscription=label, result="delivered")
        self.dead = m.deliveries.labels(subscription=label, result="dead")
        self.retries_scheduled = m.retries_scheduled.labels(subscription=label)
        self._attempts: dict[str, Any] = {}

    def attempts(self, outcome: str) -> Any:
        child = self._attempts.get(outcome)
        if child is None:
            child = self._attempts[outcome] = self._m.attempts.labels(
                subscription=self.label, outcome=outcome
            )
        return child


class Claimer:
    def __init__(
        self,
        repo: repository.Repository,
        http_sender: sender.Sender,
        m: metrics.Metrics,
        settings: config.Settings,
        *,
        rand: Callable[[], float] = random.random,
        health: HealthReport | None = None,
        tracer: tracing.Tracer = tracing.OFF,
    ) -> None:
        self._repo = repo
        self._tracer = tracer
        # Every attempt's result goes to the endpoint health monitor, which owns the
        # subscription-level consequences (pause, probe, disable on 410 or a failing streak).
        self._health = health
        self._sender = http_sender
        self._metrics = m
        self._settings = settings
        self._rand = rand
        # Slots for the jobs this process holds: on the wire (at most max_in_flight) and
        # claimed ahead, waiting in ``_ready`` for a request to end (at most prefetch). A
        # finished request starts the next held job at once, while the ack writer's round
        # trip that refills the buffer is still on its way: the wire stays full instead of
        # waiting a database round trip per freed slot. Held jobs count against their
        # subscription's max_in_flight like any claimed job, so no subscription ever has
        # more requests on the wire than its cap.
        #
        # At most max_in_flight are held ahead, and they start first come first served, so a
        # held job reaches the wire within one request deadline of its claim. One held for
        # more than half the lease margin (a short margin, a stalled loop) is handed back
        # unsent rather than sent on a lease that could expire mid-request.
        self.limiter = limiter.GlobalLimiter(settings.max_in_flight + settings.held_ahead)
        self._wire_capacity = settings.max_in_flight
        self._wire = 0
        self._ready: collections.deque[tuple[model.Job, float]] = collections.deque()
        # Per subscription: its requests on the wire, and the jobs held back because that
        # number reached the subscription's cap (``Job.wire_cap``). A process that owns a
        # subscription holds up to its cap again in claimed rows (sql/015_slot_owner.sql), so
        # a request that ends is followed by the next one at once; the database only
        # guarantees the cap on claimed rows to the others, this keeps it on the wire.
        self._sub_wire: collections.Counter[str] = collections.Counter()
        self._gated: collections.defaultdict[str, collections.deque[tuple[model.Job, float]]] = (
            collections.defaultdict(collections.deque)
        )
        # Subscriptions whose endpoint answered 410, until they are disabled (see _off_wire).
        self._gone: set[str] = set()
        self._hold_limit = settings.lease_margin_seconds / 2
        self._giving_back: set[asyncio.Task[None]] = set()
        self.acks = AckWriter(
            repo,
            settings.worker_id,
            m,
            batch=settings.ack_batch,
            on_written=_nothing,
            refill=self._refill_slots,
            on_claimed=self._claimed,
            on_claim_failed=self.wake,
            lease_seconds=settings.lease_seconds,
            ahead=settings.held_ahead,
        )
        # Bound once: the module-level proxy re-binds on every call while loggers are not
        # cached (logs.py), ~3 % of the CPU of a delivery for the canonical line (bench).
        self._log = log.bind()
        self._wake = asyncio.Event()
        # Why the next ack write should also claim (see the module docstring): the last claim
        # came back full; a request of a subscription held back by its cap finished; new work
        # was announced while every slot was busy.
        self._backlogged = False
        self._refill_wanted = False
        # Metric children per subscription label: ``labels()`` is a locked dict lookup, and
        # an attempt touched six of them (bench profile).
        self._children: dict[str, _Children] = {}
        self._children_of: dict[str, _Children] = {}  # by subscription id
        self._policies: dict[tuple[tuple[str, float], ...], config.RetryPolicy] = {}
        self._claiming = True
        self._tasks: dict[asyncio.Task[None], model.Job] = {}
        self._next_due = float("inf")
        self._claim_failures = 0
        self._failing_since: float | None = None
        m.claim_failing_seconds.set_function(self.claim_failing_seconds)

    # -- wake-ups --------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def _schedule(self, delay_seconds: float) -> None:
        self._next_due = min(self._next_due, time.monotonic() + delay_seconds)

    def _reserve(self) -> int:
        """Take the free slots a claim may fill (at most a claim batch) from the limiter.

        Deliveries are claimed ahead only while the last claim came back full: when caps or
        a short queue cut it, asking for more would only make the claim look further (every
        subscription with queued work) for slots it cannot fill."""
        free = self.limiter.free()
        if not self._backlogged:
            free -= self._settings.held_ahead
        want = min(free, self._settings.claim_batch)
        if want > 0:
            self.limiter.acquire(want)
        return want

    def _refill_slots(self) -> int:
        """For the ack writer: slots to claim with this write (reserved), or 0."""
        if not self._claiming or not (self._backlogged or self._refill_wanted):
            return 0
        want = self._reserve()
        if want > 0:
            self._refill_wanted = False
        return want

    def _claimed(self, jobs: list[model.Job], reserved: int) -> None:
        """Start what a claim returned on its reserved slots; give back the rest."""
        for job in jobs:
            self._start(job)
        if reserved > len(jobs):
            self.limiter.release(reserved - len(jobs))
        # A claim cut by the cap of a subscription this process owns says it has more work:
        # take it ahead, on held slots (see _reserve). Cut by another's rows, there is no
        # room to take it into.
        self._backlogged = len(jobs) == reserved or any(
            job.capped and job.wire_cap is not None for job in jobs
        )

    # -- main loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Claims when woken (new work, the poll, a retry coming due). Capacity freed by
        finished requests is refilled by the ack writer, in the round trip of their acks."""
        s = self._settings
        db_delay = 0.05
        while self._claiming:
            self._wake.clear()
            want = self._reserve()
            if want <= 0:
                # Every slot is busy: the next ack write claims for the new work.
                self._refill_wanted = True
                await self._idle(s.poll_interval_seconds)
                continue
            try:
                jobs = await self._claim(want)
                db_delay = 0.05
                self._claim_failures = 0
                self._failing_since = None
            except db_pool.ERRORS as exc:
                self._claim_failures += 1
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                self._claimed([], want)
                log.warning("claim_failed", error=logs.error_text(exc), retry_in=db_delay)
                await self._idle(db_delay)
                db_delay = min(db_delay * 2, 5.0)
                continue
            self._claimed(jobs, want)
            if not self._backlogged and self._claiming:
                await self._idle(self._idle_timeout())

    async def _claim(self, want: int) -> list[model.Job]:
        s = self._settings
        try:
            return await self._repo.claim(s.worker_id, want, s.lease_seconds, s.held_ahead)
        except BAD_ROW_ERRORS as exc:
            # One row the client cannot be handed (bytes that are not UTF-8 in a SQL_ASCII
            # database, say) fails the whole statement, and would fail every claim that
            # reaches it: claim without contents, read them back by id, and quarantine the
            # rows that cannot be read. The others go out as usual.
            log.warning("claim_rows_unreadable", error=type(exc).__name__, wanted=want)
            leases = await self._repo.claim_leases(s.worker_id, want, s.lease_seconds, s.held_ahead)
            return await self._read_isolating(leases)

    async def _read_isolating(self, leases: list[repository.Lease]) -> list[model.Job]:
        if not leases:
            return []
        try:
            return await self._repo.jobs_for(leases)
        except BAD_ROW_ERRORS as exc:
            if len(leases) == 1:
                self._quarantine(leases[0], exc)
                return []
            half = len(leases) // 2
            return await self._read_isolating(leases[:half]) + await self._read_isolating(
                leases[half:]
            )

    def _quarantine(self, lease: repository.Lease, exc: BaseException) -> None:
        """Dead-letter a delivery whose row cannot be read: it can never be sent as stored.
        The database's message is not kept (it can quote the row's bytes)."""
        error = f"unreadable row ({type(exc).__name__}): its contents cannot be sent as stored"
        children = self._metric_children(lease.subscription_id)
        children.attempts(model.Outcome.OTHER.value).inc()
        children.dead.inc()
        self._log.error(
            "delivery_quarantined",
            delivery_id=lease.delivery_id,
            subscription=lease.subscription_id,
            attempt=lease.attempt,
            error=type(exc).__name__,
        )
        self.acks.put(
            model.Ack(
                delivery_id=lease.delivery_id,
                lease_token=lease.lease_token,
                attempt=lease.attempt,
                state=model.DeliveryState.DEAD,
                delay_seconds=None,
                status=None,
                error=error,
                started_at=time.time(),
                duration_ms=0.0,
                outcome=model.Outcome.OTHER.value,
                response=None,
            )
        )

    def claim_failing_seconds(self) -> float:
        """How long claims have failed without a success (0 while they succeed)."""
        if self._failing_since is None:
            return 0.0
        return time.monotonic() - self._failing_since

    def not_ready_reason(self) -> str | None:
        """For readiness: why this process cannot claim, or None."""
        if self._claim_failures < CLAIM_FAILURES_UNREADY:
            return None
        return f"claims failing for {self.claim_failing_seconds():.0f}s"

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

    def _start(self, job: model.Job, held_at: float | None = None) -> bool:
        """Send a job on a slot already reserved for it, or hold it until a request ends:
        one of its subscription's, when that subscription has its cap on the wire; any
        other, when the process has. True when it went on the wire."""
        sub = job.subscription_id
        if sub in self._gone:
            self._give_back(job, "endpoint gone")
            return False
        cap = job.wire_cap
        gated = cap is not None and self._sub_wire[sub] >= cap
        if gated or self._wire >= self._wire_capacity:
            held = (job, time.monotonic() if held_at is None else held_at)
            (self._gated[sub] if gated else self._ready).append(held)
            return False
        self._wire += 1
        self._sub_wire[sub] += 1
        task = asyncio.create_task(self._deliver(job))
        self._tasks[task] = job
        task.add_done_callback(self._done)
        return True

    def _off_wire(self, sub: str, *, gone: bool = False) -> None:
        """A request of ``sub`` ended: the next held job, if any, takes its place on the wire
        (one held back by that subscription's cap first: only this can free it). After a
        410 (``gone``) the subscription's held jobs are handed back unsent instead: it is
        being disabled, and its endpoint asked for no more requests."""
        self._wire -= 1
        left = self._sub_wire[sub] - 1
        if left:
            self._sub_wire[sub] = left
        else:
            del self._sub_wire[sub]
        if gone:
            # Until it is disabled (_conclude), whatever this process holds or claims of it
            # goes back unsent; the release parks it once the subscription is disabled.
            self._gone.add(sub)
            for job, _ in self._gated.pop(sub, ()):
                self._give_back(job, "endpoint gone")
            if any(job.subscription_id == sub for job, _ in self._ready):
                for job, _ in self._ready:
                    if job.subscription_id == sub:
                        self._give_back(job, "endpoint gone")
                self._ready = collections.deque(
                    held for held in self._ready if held[0].subscription_id != sub
                )
        gated = self._gated.get(sub)
        while gated:
            job, held_at = gated.popleft()
            if not gated:
                del self._gated[sub]
            if time.monotonic() - held_at > self._hold_limit:
                self._give_back(job)
            elif self._start(job, held_at):
                return
            else:
                break  # held back again: the subscription's cap was lowered meanwhile
        while self._ready:
            job, held_at = self._ready.popleft()
            if time.monotonic() - held_at > self._hold_limit:
                self._give_back(job)
            elif self._start(job, held_at):
                return

    def _give_back(self, job: model.Job, reason: str = "held too long") -> None:
        """Hand a held job's lease back unsent (it is claimed again, same attempt number)."""
        self.limiter.release()
        self._log.warning(
            "held_delivery_released",
            delivery_id=job.delivery_id,
            subscription=job.subscription_id,
            reason=reason,
        )

        task = asyncio.create_task(self._release([job]))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def _release(self, jobs: list[model.Job]) -> None:
        try:
            await self._repo.release([(job.delivery_id, job.lease_token) for job in jobs])
        except db_pool.ERRORS as exc:
            # The lease then expires and the reaper hands the delivery back.
            log.warning("lease_release_failed", error=logs.error_text(exc), leases=len(jobs))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    # -- one delivery ----------------------------------------------------------------------

    def _metric_children(self, subscription_id: str) -> _Children:
        children = self._children_of.get(subscription_id)
        if children is None:
            # A subscription's label never changes once given (metrics.SubscriptionLabels).
            label = self._metrics.label(subscription_id)
            children = self._children.get(label)
            if children is None:
                children = self._children[label] = _Children(self._metrics, label)
            self._children_of[subscription_id] = children
        return children

    async def _deliver(self, job: model.Job) -> None:
        children = self._metric_children(job.subscription_id)
        on_wire = children.on_wire
        on_wire.n += 1
        started_at = time.time()
        span = self._tracer.attempt(job)
        released = False
        result: model.AttemptResult | None = None
        try:
            try:
                result = await self._sender.send(job, span.headers)
            except Exception as exc:  # a sender bug must not strand the delivery
                log.exception("sender_crashed", delivery_id=job.delivery_id)
                result = model.AttemptResult(
                    verdict=model.Verdict.RETRYABLE,
                    outcome=model.Outcome.OTHER,
                    status=None,
                    error=f"internal: {type(exc).__name__}",
                    duration_seconds=time.time() - started_at,
                )
            finally:
                on_wire.n -= 1
                self._off_wire(
                    job.subscription_id,
                    gone=result is not None and result.verdict is model.Verdict.GONE,
                )
            if result.verdict is not model.Verdict.GONE:
                # The slot is free once the request is over (before its ack is queued, so
                # the write that carries the ack can claim for it). After a 410 it is held
                # until the subscription is disabled (_conclude).
                self.limiter.release()
                released = True
            await self._conclude(job, result, started_at, children, span)
        finally:
            if not released:
                self.limiter.release()

    async def _conclude(
        self,
        job: model.Job,
        result: model.AttemptResult,
        started_at: float,
        children: _Children,
        span: tracing.Attempt,
    ) -> None:
        children.attempts(result.outcome.value).inc()
        children.attempt_duration.observe(result.duration_seconds)
        now = time.time()
        state, delay, error = decide(
            result,
            attempt=job.attempt,
            age_seconds=now - job.event_created_at,
            policy=self._policy(job),
            rand=self._rand,
        )
        span.finish(result, state)
        if state is model.DeliveryState.DELIVERED:
            children.delivered.inc()
            # With tracing on, the trace id rides along as an OpenMetrics exemplar.
            children.delivery_latency.observe(max(0.0, now - job.event_created_at), span.exemplar())
        elif state is model.DeliveryState.DEAD:
            children.dead.inc()
        elif state is model.DeliveryState.RETRYING:
            children.retries_scheduled.inc()
        if result.verdict is model.Verdict.BLOCKED:
            self._metrics.ssrf_blocked.inc()
        elif result.verdict is model.Verdict.UNSENDABLE:
            # Parked until the configuration changes; the attempt line below says so too, this
            # one is for the operator's alerting on log events.
            self._log.warning(
                "delivery_unsendable",
                delivery_id=job.delivery_id,
                subscription=job.subscription_id,
                reason=result.error,
            )
        self._log.info(
            "attempt",
            event_id=job.event_id,
            event_type=job.event_type,
            delivery_id=job.delivery_id,
            subscription=job.subscription_id,
            attempt=job.attempt,
            outcome=result.outcome.value,
            status=result.status,
            duration_ms=round(result.duration_seconds * 1000, 2),
            state=state.value,
            next_retry_in=None if delay is None else round(delay, 3),
            error=error if state is not model.DeliveryState.DELIVERED else None,
        )
        self.acks.put(
            model.Ack(
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
        if job.capped and result.verdict is not model.Verdict.GONE:
            self._refill_wanted = True
        if delay is not None:
            self._schedule(delay)
        if self._health is not None:
            self._health.observe(job, result)
        if result.verdict is model.Verdict.GONE:
            try:
                if self._health is not None:
                    # Awaited in this delivery's slot, as before the monitor took the decision
                    # over; until it returns, no delivery of the subscription is sent (_start).
                    await self._health.gone(job)
            finally:
                self._gone.discard(job.subscription_id)

    def _policy(self, job: model.Job) -> config.RetryPolicy:
        """The configured policy with the subscription's overrides on top (cached per set)."""
        if not job.retry_policy:
            return self._settings.retry
        key = tuple(sorted(job.retry_policy.items()))
        policy = self._policies.get(key)
        if policy is None:
            try:
                overrides: dict[str, Any] = dict(key)
                policy = dataclasses.replace(self._settings.retry, **overrides)
            except (config.ConfigError, TypeError) as exc:
                # Validated when stored, but against the defaults; a combination that does not
                # fit this process's configuration falls back to it, loudly.
                self._log.error(
                    "retry_policy_ignored", subscription=job.subscription_id, error=str(exc)
                )
                policy = self._settings.retry
            self._policies[key] = policy
        return policy

    def submit(self, job: model.Job) -> bool:
        """Send a delivery claimed elsewhere (a health probe). False when no slot is free
        or the claimer is stopping; the caller then hands the lease back."""
        if not self._claiming or self.limiter.free() <= 0:
            return False
        self.limiter.acquire()
        self._start(job)
        return True

    # -- shutdown --------------------------------------------------------------------------

    def stop_claiming(self) -> None:
        self._claiming = False
        self.wake()

    def in_flight(self) -> int:
        """Jobs held: on the wire and claimed ahead."""
        return len(self._tasks) + len(self._ready) + sum(map(len, self._gated.values()))

    async def drain(self, grace_seconds: float) -> int:
        """Wait up to ``grace_seconds`` for requests on the wire, then cancel the rest and
        hand their leases back. Returns how many were released."""
        self.stop_claiming()
        # Jobs claimed ahead never went out: their leases go back now, not after the grace.
        held = [job for job, _ in self._ready]
        held += [job for gated in self._gated.values() for job, _ in gated]
        self._ready.clear()
        self._gated.clear()
        self.limiter.release(len(held))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_seconds)
        left = dict(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(set(left), timeout=5)
        back = held + list(left.values())
        try:
            if back:
                await self._repo.release((j.delivery_id, j.lease_token) for j in back)
            # Subscriptions this process owned are free for other replicas at once.
            await self._repo.disown(self._settings.worker_id)
        except db_pool.ERRORS as exc:
            log.error("lease_release_failed", error=str(exc), leases=len(back))
        return len(back)
