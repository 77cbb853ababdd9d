"""Runs queued lead-qualification jobs in the background, one step per transaction.

The runner lists unfinished jobs, takes a job's advisory lock on a connection it keeps for the
whole job, and walks the remaining steps: pause (``step_delay_seconds``, so a human can watch
the demo), compute, commit state + webhook together. A job resumed after a crash continues at
the first uncommitted step; the stable event id per (job, step) backs that up in the outbox.
It must not send HTTP itself: callbacks leave through the outbox and the dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Callable
from typing import Any

import structlog

from dispatcher.agent import steps, store
from dispatcher.db import pool as db_pool

log = structlog.get_logger("dispatcher.agent.runner")


def utc_timestamp() -> str:
    """ISO-8601 with milliseconds and a ``Z``, as the webhook payloads carry it."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Runner:
    """Claims and runs jobs until ``stop`` is set; ``wake()`` after a job was submitted."""

    def __init__(
        self,
        pool: Any,
        *,
        worker_id: str,
        concurrency: int = 4,
        poll_interval_seconds: float = 1.0,
        step_delay_seconds: float = 0.4,
        max_runs: int = 5,
        timestamp: Callable[[], str] = utc_timestamp,
    ) -> None:
        self._pool = pool
        self._worker = worker_id
        self._concurrency = concurrency
        self._poll_interval = poll_interval_seconds
        self._step_delay = step_delay_seconds
        self._max_runs = max_runs
        self._timestamp = timestamp
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}

    def wake(self) -> None:
        self._wake.set()

    def running(self) -> list[str]:
        return sorted(self._running)

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self._claim()
                except db_pool.ERRORS as exc:
                    # The database is away: the jobs are safe in it; try again next round.
                    log.warning("agent_claim_failed", error=f"{type(exc).__name__}: {exc}")
                waiters = {asyncio.ensure_future(self._wake.wait())}
                waiters.add(asyncio.ensure_future(stop.wait()))
                await asyncio.wait(
                    waiters, timeout=self._poll_interval, return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in waiters:
                    waiter.cancel()
        finally:
            # Running jobs notice ``stop`` between steps; a step mid-commit finishes first.
            if self._running:
                await asyncio.wait(list(self._running.values()), timeout=10)
            for task in list(self._running.values()):
                task.cancel()

    async def _claim(self) -> None:
        free = self._concurrency - len(self._running)
        if free <= 0:
            return
        async with self._pool.acquire() as conn:
            ids = await store.candidates(conn, free + len(self._running) + 8)
        for job_id in ids:
            if len(self._running) >= self._concurrency or self._stop.is_set():
                return
            if job_id in self._running:
                continue
            conn = await self._pool.acquire()
            try:
                locked = await store.try_lock(conn, job_id)
            except BaseException:
                await self._pool.release(conn)
                raise
            if not locked:
                # Another replica (or a dying connection of ours) holds it.
                await self._pool.release(conn)
                continue
            task = asyncio.create_task(self._own(conn, job_id), name=f"job-{job_id}")
            self._running[job_id] = task

    async def _own(self, conn: Any, job_id: str) -> None:
        """Run one job on ``conn``, which holds the job's advisory lock; always let go."""
        interrupted = False
        try:
            await self._run_job(conn, job_id)
        except store.StaleJob as exc:
            log.info("agent_job_stale", job_id=job_id, detail=str(exc))
        except db_pool.ERRORS as exc:
            # Left unfinished: a later claim round (here or on a replica) resumes it, and
            # ``max_runs`` stops a job that fails this way forever.
            interrupted = True
            log.warning(
                "agent_job_interrupted", job_id=job_id, error=f"{type(exc).__name__}: {exc}"
            )
        finally:
            self._running.pop(job_id, None)
            with contextlib.suppress(*db_pool.ERRORS):
                await store.unlock(conn, job_id)
            await self._pool.release(conn)
            if not interrupted:
                # A slot is free: look for more work now. After an interruption the next
                # poll is soon enough, and retrying at once would spin on a lasting fault.
                self._wake.set()

    async def _pause(self) -> bool:
        """The step delay; False when stopping (the job is resumed later, not abandoned)."""
        if self._step_delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._step_delay)
        return not self._stop.is_set()

    async def _run_job(self, conn: Any, job_id: str) -> None:
        job = await store.start_run(conn, job_id, self._worker)
        if job is None:
            return
        if job.runs > self._max_runs:
            reason = f"gave up after {job.runs - 1} interrupted runs"
            await self._fail(conn, job, None, reason)
            return
        log.info("agent_job_started", job_id=job.id, step=job.step, run=job.runs)
        enriched, checked = job.enriched, job.checked
        for step in steps.STEPS[job.step :]:
            if not await self._pause():
                log.info("agent_job_paused", job_id=job.id, next_step=step.key)
                return
            stamp = self._timestamp()
            try:
                if step.key == "enrichment":
                    enriched = steps.enrich(job.prospects)
                    payload = steps.progress_payload(job.id, step, stamp, enriched)
                    await store.commit_step(conn, job, step, payload, enriched=enriched)
                elif step.key == "criteria":
                    checked = steps.check_criteria(enriched or [], job.criteria)
                    payload = steps.progress_payload(job.id, step, stamp, checked)
                    await store.commit_step(conn, job, step, payload, checked=checked)
                else:
                    results = steps.score(checked or [], job.criteria)
                    payload = steps.complete_payload(job.id, step, stamp, results)
                    await store.commit_step(conn, job, step, payload, results=results)
            except steps.StepFailed as exc:
                await self._fail(conn, job, step, exc.reason)
                return
            except (store.StaleJob, *db_pool.ERRORS):
                raise
            except Exception:
                # A bug in a deterministic step fails the same way on every run: fail the
                # job (the caller hears why) instead of retrying it max_runs times.
                log.exception("agent_step_crashed", job_id=job.id, step=step.key)
                await self._fail(conn, job, step, f"internal error during {step.current_step}")
                return
            log.info("agent_step_committed", job_id=job.id, step=step.key, status=step.status)

    async def _fail(self, conn: Any, job: store.Job, step: steps.Step | None, reason: str) -> None:
        payload = steps.failed_payload(job.id, step, self._timestamp(), reason)
        await store.fail_job(conn, job, reason, payload)
        log.info("agent_job_failed", job_id=job.id, step=step.key if step else None)
