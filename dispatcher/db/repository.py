"""The outbox/delivery repository: every SQL statement the dispatcher runs lives here.

Each query carries a comment on its locking intent. No HTTP, no retry policy: callers pass
decisions in (``Ack``) and get plain values back.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from dispatcher import model, secretbox
from dispatcher.db import operational

WORK_CHANNEL = "dispatcher_work"
OUTBOX_CHANNEL = "dispatcher_outbox"


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """A claimed delivery before its contents are read (see ``claim_leases``)."""

    delivery_id: int
    lease_token: int
    attempt: int
    subscription_id: str
    capped: bool
    wire_cap: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Reclaimed:
    requeued: int
    dead: int


_ROUTE_SQL = """
-- Lock a batch of unrouted events (SKIP LOCKED: replicas route disjoint batches), create one
-- delivery per matching subscription (the unique key makes a retried routing a no-op), and
-- mark the events routed in the same transaction. '*' matches every type but the dispatcher's
-- own operational events ('dispatcher.…', sql/011): those go only to subscriptions that name
-- them, so no existing catch-all subscription starts receiving them.
WITH batch AS (
    SELECT o.id, o.event_type, o.subscription_id, o.ordering_key, o.created_at
    FROM webhook_outbox o
    WHERE o.routed_at IS NULL
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), targets AS (
    -- Events for one subscription by id; the others through the pattern index (007): each
    -- event type expands into the patterns that can match it, so routing costs a few index
    -- probes per event whatever the number of subscriptions. UNION: one delivery per pair
    -- even when several patterns of a subscription match.
    SELECT b.id AS outbox_id, s.id AS subscription_id, b.ordering_key, b.created_at, s.enabled
    FROM batch b
    JOIN webhook_subscriptions s ON s.id = b.subscription_id
    -- Redundant for the join, but it gives the planner the small estimate that keeps it on
    -- the primary key (without it: a hash join over every subscription per batch).
    WHERE b.subscription_id IS NOT NULL
    UNION
    SELECT b.id, s.id, b.ordering_key, b.created_at, s.enabled
    FROM batch b
    -- Index probes per event whatever the tables' statistics say (sql/014: a scan of the
    -- pattern table per event once took 30 s for a batch).
    CROSS JOIN LATERAL dispatcher_route_matches(b.event_type) AS m(subscription_id)
    JOIN webhook_subscriptions s ON s.id = m.subscription_id
    WHERE b.subscription_id IS NULL AND s.enabled
), created AS (
    INSERT INTO webhook_deliveries
        (outbox_id, subscription_id, ordering_key, event_created_at, state)
    SELECT t.outbox_id, t.subscription_id, t.ordering_key, t.created_at,
           CASE WHEN t.enabled THEN 'pending' ELSE 'parked' END
    FROM targets t
    ORDER BY t.outbox_id, t.subscription_id
    ON CONFLICT (outbox_id, subscription_id) DO NOTHING
    RETURNING 1
), notified AS (
    -- Wake every replica's claimer when work was created; delivered at commit. One
    -- statement, so routing is one round trip (no BEGIN/NOTIFY/COMMIT of its own).
    SELECT pg_notify($2, '') FROM (SELECT 1 FROM created LIMIT 1) x
), fanout AS (
    -- Counted once per event (a lookup per row into targets was quadratic in the batch).
    SELECT t.outbox_id, count(*) AS n FROM targets t GROUP BY t.outbox_id
)
UPDATE webhook_outbox o
SET routed_at = now(),
    delivery_count = coalesce(f.n, 0),
    route_result = CASE
        WHEN f.n IS NOT NULL THEN 'routed'
        WHEN o.subscription_id IS NOT NULL THEN 'unknown_subscription'
        ELSE 'unmatched' END
FROM batch b
LEFT JOIN fanout f ON f.outbox_id = b.id
WHERE o.id = b.id
RETURNING o.route_result, o.delivery_count, (SELECT count(*) FROM created) AS created,
          (SELECT count(*) FROM notified) AS notified, o.traceparent, o.tracestate
"""

# Both apply results fenced on the lease token (sql/007_engine.sql); the second also claims
# the next batch in the same round trip, on a snapshot that sees the freed slots.
_ACK_SQL = "SELECT * FROM dispatcher_ack($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
_COMPLETE_AND_CLAIM_SQL = """
SELECT * FROM dispatcher_complete_and_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                                            $13, $14, $15, $16)
"""
# p_ahead: how many of a subscription's rows beyond its cap this process may hold while it
# owns the subscription (sql/015_slot_owner.sql); 0 never owns.
_CLAIM_SQL = "SELECT * FROM dispatcher_claim($1, $2, $3, $4)"

# The claim without the row contents: ids only, so a row the client encoding cannot carry
# (bytes that are not UTF-8 in a SQL_ASCII database) does not fail the statement; the
# contents are then read by id, where such a row can be told apart and quarantined.
_CLAIM_IDS_SQL = """
SELECT c.delivery_id, c.lease_token, c.attempt, c.subscription_id, c.capped, c.wire_cap
FROM dispatcher_claim($1, $2, $3, $4) c
"""
_JOBS_BY_ID_SQL = """
-- Claimed deliveries read back by id with the claim's columns; no locks: they are leased to
-- this worker already (the lease token must still match).
SELECT d.id AS delivery_id, d.lease_token, d.attempt, d.subscription_id, s.url, o.event_id,
       o.event_type, o.payload::text AS body, s.secret,
       CASE WHEN s.previous_secret_until > now() THEN s.previous_secret END AS previous_secret,
       s.signature_header, s.signers, s.headers::text AS headers,
       extract(epoch FROM o.created_at)::double precision AS event_created_at,
       d.ordering_key, d.manual_replay AS manual, s.retry_policy::text AS retry_policy,
       o.traceparent, o.tracestate, c.capped, c.wire_cap
FROM unnest($1::bigint[], $2::bigint[], $3::bool[], $4::int[]) AS c(id, token, capped, wire_cap)
JOIN webhook_deliveries d ON d.id = c.id AND d.lease_token = c.token
JOIN webhook_outbox o ON o.id = d.outbox_id
JOIN webhook_subscriptions s ON s.id = d.subscription_id
"""

_RECLAIM_SQL = """
-- Expired leases go back to the queue (or die when the attempt limit is reached: the attempt
-- counter moved at claim time, so a delivery that keeps killing workers ends up dead).
-- SKIP LOCKED: never wait on a row an ack is updating right now.
WITH expired AS (
    SELECT id FROM webhook_deliveries
    WHERE state = 'in_flight' AND leased_until < now()
    ORDER BY leased_until
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries d
SET state = CASE WHEN d.attempt >= $1 THEN 'dead' ELSE 'retrying' END,
    next_attempt_at = now(),
    leased_until = NULL,
    lease_token = NULL,
    leased_by = NULL,
    last_error = 'lease expired (worker lost)',
    finished_at = CASE WHEN d.attempt >= $1 THEN now() END,
    updated_at = now()
FROM expired
WHERE d.id = expired.id
RETURNING d.state
"""

_RELEASE_SQL = """
-- Hand back leases this worker will not finish (shutdown, held too long, endpoint gone):
-- fenced on the token, and the attempt is not counted against the delivery. The delivery
-- of a disabled subscription is parked, as disabling parks its queued work. The row lock
-- (the one the counting trigger takes anyway, taken first: subscription, then deliveries,
-- as a claim does) orders this against a disable in progress, which holds the row FOR
-- UPDATE: whichever comes second sees the other's result, so nothing is left queued on a
-- disabled subscription.
WITH subs AS (
    SELECT s.id, s.enabled
    FROM webhook_subscriptions s
    WHERE s.id IN (SELECT d.subscription_id FROM webhook_deliveries d
                   WHERE d.id = ANY ($1::bigint[]))
    ORDER BY s.id
    FOR NO KEY UPDATE
)
UPDATE webhook_deliveries d
SET state = CASE WHEN subs.enabled THEN 'retrying' ELSE 'parked' END,
    next_attempt_at = now(), attempt = greatest(d.attempt - 1, 0),
    leased_until = NULL, lease_token = NULL, leased_by = NULL, updated_at = now()
FROM unnest($1::bigint[], $2::bigint[]) AS r(id, token), subs
WHERE d.id = r.id AND d.lease_token = r.token AND d.state = 'in_flight'
  AND subs.id = d.subscription_id
"""

_DISABLE_SQL = """
-- Disable a subscription and park its queued work (kept, not lost; enabling resumes it).
WITH sub AS (
    UPDATE webhook_subscriptions
    SET enabled = false, disabled_reason = $2, disabled_at = now(), updated_at = now()
    WHERE id = $1 AND enabled
    RETURNING id
)
UPDATE webhook_deliveries d
SET state = 'parked', updated_at = now()
FROM sub
WHERE d.subscription_id = sub.id AND d.state IN ('pending', 'retrying')
"""

_ENABLE_SQL = """
-- Re-enable and put parked work back in the queue.
WITH sub AS (
    UPDATE webhook_subscriptions
    SET enabled = true, disabled_reason = NULL, disabled_at = NULL, updated_at = now()
    WHERE id = $1
    RETURNING id
)
UPDATE webhook_deliveries d
SET state = 'pending', next_attempt_at = now(), updated_at = now()
FROM sub
WHERE d.subscription_id = sub.id AND d.state = 'parked'
"""

SUBSCRIPTION_COLUMNS = """
    id, url, event_types, secret, signature_header, signers, headers::text AS headers,
    max_in_flight, rate_limit_per_second, description, metadata::text AS metadata, enabled,
    disabled_reason, disabled_at, created_at, updated_at,
    (previous_secret_until > now()) IS TRUE AS rotating,
    CASE WHEN previous_secret_until > now() THEN previous_secret_until END AS rotation_ends_at,
    retry_policy::text AS retry_policy
"""


# What a read shows for a custom header's value: they often carry credentials for the receiver
# (Authorization), so like secrets they are stored sealed and never shown again.
MASKED_HEADER_VALUE = "********"


def sealed_headers(box: secretbox.SecretBox, headers: dict[str, str] | None) -> str:
    """Custom headers as the ``headers`` column stores them: JSON, each value sealed."""
    return orjson.dumps({name: box.seal(value) for name, value in (headers or {}).items()}).decode()


def _open_headers(box: secretbox.SecretBox, stored: str) -> dict[str, str]:
    # Rows from before values were sealed hold them in clear; open() passes those through.
    return {name: box.open(value) for name, value in orjson.loads(stored).items()}


def _job(row: Any, box: secretbox.SecretBox) -> model.Job:
    # Stored secrets may be sealed (secretbox); the box caches what it opened, so a claim of
    # many deliveries for one subscription decrypts once. A secret this process cannot open
    # (sealed under a key it does not hold) belongs to this row alone: the job carries the
    # reason and the sender parks it, while the rest of the claim goes out.
    problem: str | None = None
    secrets: tuple[str, ...] = ()
    headers: dict[str, str] = {}
    try:
        secrets = (
            (box.open(row["secret"]),)
            if row["previous_secret"] is None
            else (box.open(row["secret"]), box.open(row["previous_secret"]))
        )
    except secretbox.SecretBoxError as exc:
        problem = f"secret: {exc}"
    try:
        stored_headers = row["headers"]
        # Most subscriptions have no custom headers: no JSON to parse.
        headers = {} if stored_headers == "{}" else _open_headers(box, stored_headers)
    except secretbox.SecretBoxError as exc:
        problem = problem or f"headers: {exc}"
    return model.Job(
        delivery_id=row["delivery_id"],
        lease_token=row["lease_token"],
        attempt=row["attempt"],
        subscription_id=str(row["subscription_id"]),
        url=row["url"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        body=row["body"].encode(),
        secrets=secrets,
        signature_header=row["signature_header"],
        signers=tuple(row["signers"]),
        headers=headers,
        event_created_at=row["event_created_at"],
        ordering_key=row["ordering_key"],
        manual=row["manual"],
        retry_policy=orjson.loads(row["retry_policy"]) if row["retry_policy"] else None,
        traceparent=row["traceparent"],
        tracestate=row["tracestate"],
        capped=row["capped"],
        # The probe's claim has no such column: it takes one delivery, never above the cap.
        wire_cap=row.get("wire_cap"),
        problem=problem,
    )


def _ack_columns(acks: Sequence[model.Ack]) -> tuple[list[Any], ...]:
    """Acks as the column arrays dispatcher_ack() takes (one array per field)."""
    return (
        [a.delivery_id for a in acks],
        [a.lease_token for a in acks],
        [a.state for a in acks],
        [a.delay_seconds for a in acks],
        [a.status for a in acks],
        [a.error for a in acks],
        [a.attempt for a in acks],
        [a.started_at for a in acks],
        [a.duration_ms for a in acks],
        [a.outcome for a in acks],
        [a.response for a in acks],
        [a.manual for a in acks],
    )


class Repository:
    """Outbox, deliveries, attempts and subscriptions over an asyncpg pool."""

    def __init__(self, pool: Any, *, box: secretbox.SecretBox | None = None) -> None:
        self.pool = pool
        # Seals secrets on the way in and opens them on the way out (plaintext without keys).
        self.box = box or secretbox.PLAINTEXT

    # -- routing ---------------------------------------------------------------------------

    async def route(self, limit: int) -> model.RouteStats:
        rows = await self.pool.fetch(_ROUTE_SQL, limit, WORK_CHANNEL)
        results = [r["route_result"] for r in rows]
        return model.RouteStats(
            events=len(rows),
            routed=results.count("routed"),
            unmatched=results.count("unmatched"),
            unknown_subscription=results.count("unknown_subscription"),
            deliveries=rows[0]["created"] if rows else 0,
            traced=tuple((r["traceparent"], r["tracestate"]) for r in rows if r["traceparent"]),
        )

    # -- claiming and acknowledging --------------------------------------------------------

    async def claim(
        self, worker: str, limit: int, lease_seconds: float, ahead: int = 0
    ) -> list[model.Job]:
        # One round trip; the locking lives in dispatcher_claim() (sql/007, sql/015).
        rows = await self.pool.fetch(_CLAIM_SQL, worker, limit, lease_seconds, ahead)
        return [_job(r, self.box) for r in rows]

    async def claim_leases(
        self, worker: str, limit: int, lease_seconds: float, ahead: int = 0
    ) -> list[Lease]:
        """The claim, returning leases without contents (see ``_CLAIM_IDS_SQL``)."""
        rows = await self.pool.fetch(_CLAIM_IDS_SQL, worker, limit, lease_seconds, ahead)
        return [Lease(r[0], r[1], r[2], str(r[3]), r[4], r[5]) for r in rows]

    async def jobs_for(self, leases: Sequence[Lease]) -> list[model.Job]:
        """The jobs of leases this worker holds (read by id; a stale lease reads nothing)."""
        rows = await self.pool.fetch(
            _JOBS_BY_ID_SQL,
            [x.delivery_id for x in leases],
            [x.lease_token for x in leases],
            [x.capped for x in leases],
            [x.wire_cap for x in leases],
        )
        return [_job(r, self.box) for r in rows]

    async def claim_probe(
        self, worker: str, subscription_id: str, lease_seconds: float
    ) -> list[model.Job]:
        """One delivery of a paused subscription, for the health probe (sql/005)."""
        rows = await self.pool.fetch(
            "SELECT * FROM dispatcher_claim_probe($1, $2, $3)",
            worker,
            uuid.UUID(subscription_id),
            lease_seconds,
        )
        return [_job(r, self.box) for r in rows]

    async def ack(self, acks: Sequence[model.Ack], worker: str) -> set[int]:
        """Apply results; return the ids whose token still matched (the rest were stale)."""
        rows = await self.pool.fetch(_ACK_SQL, *_ack_columns(acks), worker)
        return {r[0] for r in rows}

    async def complete_and_claim(
        self,
        acks: Sequence[model.Ack],
        worker: str,
        limit: int,
        lease_seconds: float,
        ahead: int = 0,
    ) -> tuple[set[int], list[model.Job]]:
        """Apply results and claim up to ``limit`` deliveries in one round trip (one
        transaction: a failure applies neither). → (applied ids, claimed jobs)."""
        rows = await self.pool.fetch(
            _COMPLETE_AND_CLAIM_SQL, *_ack_columns(acks), worker, limit, lease_seconds, ahead
        )
        applied = {r["acked"] for r in rows if r["acked"] is not None}
        jobs = [_job(r, self.box) for r in rows if r["acked"] is None]
        return applied, jobs

    async def reclaim_expired(self, max_attempts: int) -> Reclaimed:
        rows = await self.pool.fetch(_RECLAIM_SQL, max_attempts)
        dead = sum(1 for r in rows if r["state"] == model.DeliveryState.DEAD)
        return Reclaimed(requeued=len(rows) - dead, dead=dead)

    async def disown(self, worker: str) -> None:
        """Give up the subscriptions this worker owns (sql/015), when it stops claiming."""
        await self.pool.execute("SELECT dispatcher_disown($1)", worker)

    async def release(self, leases: Iterable[tuple[int, int]]) -> None:
        pairs = list(leases)
        if pairs:
            await self.pool.execute(_RELEASE_SQL, [p[0] for p in pairs], [p[1] for p in pairs])

    # -- subscriptions ---------------------------------------------------------------------

    async def disable_subscription(
        self, subscription_id: str, reason: str, *, kind: str = operational.OPERATOR
    ) -> bool:
        """Disable and park; ``kind`` (operator | gone | failing) is the reason the
        operational event announces (sql/011). False when it was already disabled."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(operational.MARK_CHANGE_SQL, kind)
            # Row lock (FOR UPDATE via UPDATE) waits for a claim in progress on this subscription.
            was_enabled = await conn.fetchval(
                "SELECT enabled FROM webhook_subscriptions WHERE id = $1 FOR UPDATE",
                uuid.UUID(subscription_id),
            )
            await conn.execute(_DISABLE_SQL, uuid.UUID(subscription_id), reason)
        return bool(was_enabled)

    async def enable_subscription(self, subscription_id: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_ENABLE_SQL, uuid.UUID(subscription_id))
            await conn.execute("SELECT pg_notify($1, '')", WORK_CHANNEL)

    async def create_subscription(
        self,
        *,
        url: str,
        event_types: Sequence[str],
        secret: str,
        signature_header: str | None = None,
        signers: Sequence[str] = (),
        max_in_flight: int = 10,
        description: str = "",
        headers: dict[str, str] | None = None,
        subscription_id: uuid.UUID | None = None,
        rate_limit_per_second: float | None = None,
        retry_policy: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        # Plain insert; the primary key rejects a duplicate explicit id.
        row = await self.pool.fetchrow(
            f"""
            INSERT INTO webhook_subscriptions (id, url, event_types, secret, signature_header,
                                               signers, max_in_flight, description, headers,
                                               rate_limit_per_second, retry_policy, metadata)
            VALUES (COALESCE($1, gen_random_uuid()), $2, $3, $4, $5, $6, $7, $8, $9::jsonb,
                    $10, $11::jsonb, $12::jsonb)
            RETURNING {SUBSCRIPTION_COLUMNS}
            """,
            subscription_id,
            url,
            list(event_types),
            self.box.seal(secret),
            signature_header,
            list(signers),
            max_in_flight,
            description,
            sealed_headers(self.box, headers),
            rate_limit_per_second,
            None if retry_policy is None else orjson.dumps(retry_policy).decode(),
            orjson.dumps(metadata or {}).decode(),
        )
        return {**subscription_dict(row), "secret": secret}

    async def list_subscriptions(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            f"SELECT {SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions ORDER BY created_at, id"
        )
        return [subscription_dict(r) for r in rows]

    # -- health ----------------------------------------------------------------------------

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")


def subscription_dict(row: Any) -> dict[str, Any]:
    """A subscription as the API and CLI show it (never its secret)."""
    out: dict[str, Any] = {
        "id": str(row["id"]),
        "url": row["url"],
        "event_types": list(row["event_types"]),
        "signature_header": row["signature_header"],
        "signers": list(row["signers"]),
        "headers": dict.fromkeys(orjson.loads(row["headers"]), MASKED_HEADER_VALUE),
        "max_in_flight": row["max_in_flight"],
        "rate_limit_per_second": row["rate_limit_per_second"],
        "description": row["description"],
        "metadata": orjson.loads(row["metadata"]),
        "enabled": row["enabled"],
        "disabled_reason": row["disabled_reason"],
        "disabled_at": row["disabled_at"].isoformat() if row["disabled_at"] else None,
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
        "rotating": row["rotating"],
        "rotation_ends_at": (
            row["rotation_ends_at"].isoformat() if row["rotation_ends_at"] else None
        ),
        "retry_policy": orjson.loads(row["retry_policy"]) if row["retry_policy"] else None,
    }
    return out
