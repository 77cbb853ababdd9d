"""The agent's job store: every SQL statement the reference agent runs lives here.

A job is written with its callback subscription in one transaction; each pipeline step later
writes the job's new state and its outbox event (through :func:`dispatcher.publish`, on the
same connection) in one transaction. A runner holds a session-level advisory lock on a job
while it works on it, so two agent replicas never run the same job at once, and a runner that
dies (even by SIGKILL) lets go the moment its connection closes. No HTTP and no pipeline
logic here: callers pass computed values in and get plain values back.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import uuid
from typing import Any

import orjson
import structlog

import dispatcher
from dispatcher import secretbox
from dispatcher.agent import steps
from dispatcher.db import migrate

log = structlog.get_logger("dispatcher.agent.store")

# The agent's own schema (its job table): a migration track beside the dispatcher's, applied
# by `dispatcher agent --migrate`.
MIGRATIONS = migrate.Track(
    "agent",
    pathlib.Path(__file__).resolve().parent / "sql",
    "agent_migrations",
    "dispatcher agent --migrate",
)
NOTIFY_CHANNEL = "agent_jobs"
# uuid5 namespace for callback subscriptions: the same webhook_url → the same subscription.
SUBSCRIPTION_NAMESPACE = uuid.UUID("6f1c2a4e-8a53-5c1e-9d0b-2f4f3a9c7e11")
SIGNATURE_HEADER = "X-AgentX-Signature"
# A changed AGENT_WEBHOOK_SECRET keeps signing with the old one too (Standard Webhooks
# header only) for this long, so receivers can switch without dropping callbacks.
ROTATION_GRACE = datetime.timedelta(days=1)
TERMINAL = (steps.STATUS_COMPLETE, steps.STATUS_FAILED)


class StaleJob(Exception):
    """The job is not in the state this runner expected (finished or moved on meanwhile)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    id: str
    status: str
    step: int
    prospects: list[dict[str, Any]]
    criteria: dict[str, Any]
    subscription_id: uuid.UUID
    enriched: list[dict[str, Any]] | None
    checked: list[dict[str, Any]] | None
    runs: int
    # The submitting request's W3C trace context: the callbacks continue the caller's trace.
    traceparent: str | None = None
    tracestate: str | None = None


def subscription_id_for(url: str) -> uuid.UUID:
    return uuid.uuid5(SUBSCRIPTION_NAMESPACE, url)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)


_UPSERT_SUBSCRIPTION_SQL = """
-- A new callback URL gets its subscription; an existing one is left alone (no row lock, so
-- a dispatcher claiming for it is not held up). ON CONFLICT makes concurrent submissions safe.
INSERT INTO webhook_subscriptions (id, url, event_types, secret, signature_header, description)
VALUES ($1, $2, $3, $4, $5, 'lead-qualification agent callbacks')
ON CONFLICT (id) DO NOTHING
RETURNING id
"""

_READ_SUBSCRIPTION_SQL = """
-- Plain read, no lock: most submissions find the subscription as it should be.
SELECT secret, signature_header FROM webhook_subscriptions WHERE id = $1
"""

_ROTATE_SUBSCRIPTION_SQL = """
-- Only when the agent's secret or header changed. Guarded on the stored value read just
-- before, so of two racing submissions one rotates and the other changes nothing. The old
-- secret keeps signing (Standard Webhooks header) through a grace period.
UPDATE webhook_subscriptions
SET previous_secret = CASE WHEN $5 THEN secret ELSE previous_secret END,
    previous_secret_until = CASE WHEN $5 THEN now() + $6::interval
                                 ELSE previous_secret_until END,
    secret = CASE WHEN $5 THEN $2 ELSE secret END,
    signature_header = $3, updated_at = now()
WHERE id = $1 AND secret = $4
"""

_INSERT_JOB_SQL = """
-- Plain insert; the primary key rejects a colliding id (80 random bits: never in practice).
INSERT INTO agent_jobs (id, prospects, criteria, webhook_url, subscription_id, traceparent,
                        tracestate)
VALUES ($1, $2::jsonb, $3::jsonb, $4, $5, $6, $7)
"""

_CANDIDATES_SQL = """
-- No lock: the advisory lock taken next decides who runs a job; this only lists candidates.
SELECT id FROM agent_jobs
WHERE status NOT IN ('COMPLETE', 'FAILED')
ORDER BY created_at, id
LIMIT $1
"""

# hashtextextended gives a bigint key per job id; a collision only makes one job wait a turn.
_TRY_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended('agent_job:' || $1, 0))"
_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtextextended('agent_job:' || $1, 0))"

_START_RUN_SQL = """
-- Called with the advisory lock held: count the run and load the state to resume from. A job
-- that finished between listing and locking returns no row.
UPDATE agent_jobs
SET runs = runs + 1, last_worker = $2, updated_at = now()
WHERE id = $1 AND status NOT IN ('COMPLETE', 'FAILED')
RETURNING id, status, step, prospects::text, criteria::text, subscription_id,
          enriched::text, checked::text, runs, traceparent, tracestate
"""

_LOCK_JOB_SQL = """
-- Row lock for the step's transaction: the step number read here is the one this
-- transaction advances, whatever else happens to the row concurrently.
SELECT step, status FROM agent_jobs WHERE id = $1 FOR UPDATE
"""

_ADVANCE_SQL = """
UPDATE agent_jobs
SET step = $2, status = $3, current_step = $4, percentage = $5,
    enriched = COALESCE($6::jsonb, enriched),
    checked = COALESCE($7::jsonb, checked),
    results = COALESCE($8::jsonb, results),
    updated_at = now(),
    finished_at = CASE WHEN $3 IN ('COMPLETE', 'FAILED') THEN now() END
WHERE id = $1
"""

_FAIL_SQL = """
UPDATE agent_jobs
SET status = 'FAILED', error = $2, updated_at = now(), finished_at = now()
WHERE id = $1
"""

_GET_JOB_SQL = """
-- Plain read for GET /api/v1/jobs/{id}.
SELECT id, status, step, current_step, percentage, results::text, error, webhook_url,
       jsonb_array_length(prospects) AS prospect_count, created_at, updated_at, finished_at
FROM agent_jobs WHERE id = $1
"""


async def create_job(
    conn: Any,
    *,
    job_id: str,
    prospects: list[dict[str, Any]],
    criteria: dict[str, Any],
    webhook_url: str,
    secret: str,
    box: secretbox.SecretBox = secretbox.PLAINTEXT,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> uuid.UUID:
    """Job and callback subscription in one transaction; returns the subscription id.

    The secret is stored sealed when ``box`` has keys, like every subscription secret."""
    sub = subscription_id_for(webhook_url)
    async with conn.transaction():
        inserted = await conn.fetchval(
            _UPSERT_SUBSCRIPTION_SQL,
            sub,
            webhook_url,
            list(steps.EVENT_TYPES),
            box.seal(secret),
            SIGNATURE_HEADER,
        )
        if inserted is None:
            await _refresh_subscription(conn, sub, secret, box)
        await conn.execute(
            _INSERT_JOB_SQL,
            job_id,
            _json(prospects),
            _json(criteria),
            webhook_url,
            sub,
            traceparent,
            tracestate,
        )
        # Wakes every agent replica's runner; delivered at commit, lost on rollback.
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, job_id)
    return sub


async def _refresh_subscription(
    conn: Any, sub: uuid.UUID, secret: str, box: secretbox.SecretBox
) -> None:
    row = await conn.fetchrow(_READ_SUBSCRIPTION_SQL, sub)
    if row is None:
        return
    try:
        current = box.open(row["secret"])
    except secretbox.SecretBoxError:
        # Sealed under a key this agent was not given: leave it to the dispatcher, which
        # can open it, rather than rotating on every submission.
        log.warning("agent_subscription_secret_unreadable", subscription=str(sub))
        return
    rotate = current != secret
    if rotate or row["signature_header"] != SIGNATURE_HEADER:
        await conn.execute(
            _ROTATE_SUBSCRIPTION_SQL,
            sub,
            box.seal(secret),
            SIGNATURE_HEADER,
            row["secret"],
            rotate,
            ROTATION_GRACE,
        )


async def candidates(conn: Any, limit: int) -> list[str]:
    return [r["id"] for r in await conn.fetch(_CANDIDATES_SQL, limit)]


async def try_lock(conn: Any, job_id: str) -> bool:
    return bool(await conn.fetchval(_TRY_LOCK_SQL, job_id))


async def unlock(conn: Any, job_id: str) -> None:
    await conn.fetchval(_UNLOCK_SQL, job_id)


async def start_run(conn: Any, job_id: str, worker: str) -> Job | None:
    row = await conn.fetchrow(_START_RUN_SQL, job_id, worker)
    if row is None:
        return None
    return Job(
        id=row["id"],
        status=row["status"],
        step=row["step"],
        prospects=orjson.loads(row["prospects"]),
        criteria=orjson.loads(row["criteria"]),
        subscription_id=row["subscription_id"],
        enriched=_loads(row["enriched"]),
        checked=_loads(row["checked"]),
        runs=row["runs"],
        traceparent=row["traceparent"],
        tracestate=row["tracestate"],
    )


async def commit_step(
    conn: Any,
    job: Job,
    step: steps.Step,
    payload: dict[str, Any],
    *,
    enriched: list[dict[str, Any]] | None = None,
    checked: list[dict[str, Any]] | None = None,
    results: list[dict[str, Any]] | None = None,
) -> None:
    """The step's state change and its webhook, committed together or not at all."""
    async with conn.transaction():
        row = await conn.fetchrow(_LOCK_JOB_SQL, job.id)
        if row is None or row["status"] in TERMINAL or row["step"] != step.number - 1:
            raise StaleJob(f"job {job.id} is not waiting for step {step.number}")
        await dispatcher.publish(
            conn,
            step.event,
            payload,
            event_id=steps.event_id(job.id, step.key),
            subscription_id=job.subscription_id,
            ordering_key=job.id,
            traceparent=job.traceparent,
            tracestate=job.tracestate,
        )
        await conn.execute(
            _ADVANCE_SQL,
            job.id,
            step.number,
            step.status,
            step.current_step,
            step.percentage,
            None if enriched is None else _json(enriched),
            None if checked is None else _json(checked),
            None if results is None else _json(results),
        )


async def fail_job(conn: Any, job: Job, reason: str, payload: dict[str, Any]) -> None:
    """Mark the job FAILED and publish LEAD_QUALIFICATION_FAILED, in one transaction."""
    async with conn.transaction():
        row = await conn.fetchrow(_LOCK_JOB_SQL, job.id)
        if row is None or row["status"] in TERMINAL:
            raise StaleJob(f"job {job.id} already finished")
        await dispatcher.publish(
            conn,
            steps.EVENT_FAILED,
            payload,
            event_id=steps.event_id(job.id, steps.FAILED_KEY),
            subscription_id=job.subscription_id,
            ordering_key=job.id,
            traceparent=job.traceparent,
            tracestate=job.tracestate,
        )
        await conn.execute(_FAIL_SQL, job.id, reason)


async def get_job(conn: Any, job_id: str) -> dict[str, Any] | None:
    """A job as ``GET /api/v1/jobs/{id}`` shows it."""
    row = await conn.fetchrow(_GET_JOB_SQL, job_id)
    if row is None:
        return None
    return {
        "job_id": row["id"],
        "status": row["status"],
        "progress": {"current_step": row["current_step"], "percentage": row["percentage"]},
        "prospect_count": row["prospect_count"],
        "results": _loads(row["results"]),
        "error": row["error"],
        "webhook_url": row["webhook_url"],
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "finished_at": _iso(row["finished_at"]) if row["finished_at"] else None,
    }


def _iso(value: datetime.datetime) -> str:
    return value.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
