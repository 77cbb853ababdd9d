"""SQL for the management operations the admin API and the CLI share (one implementation).

Takes values that are already validated (``dispatcher.validation`` validates) and returns plain
dicts in the shape the API serves. Unknown ids raise ``NotFound``; operations that do not
fit the current state raise ``Conflict``. The delivery-core SQL and the basic subscription
statements stay in ``repository``; this module reuses them. No HTTP, no argument parsing,
and never a secret in a listing: secrets come back only from create and rotate.

Listings use keyset pagination (``WHERE key < cursor ORDER BY key DESC``): a page never
repeats or skips a row that existed when the traversal started, however many rows arrive
meanwhile. The caller encodes the returned key as an opaque cursor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson

from dispatcher import model, secretbox, signing, validation
from dispatcher.db import operational, outbox, repository

TEST_EVENT_TYPE = "dispatcher.test"
# Resolves a new or changed URL's host: the reason every address it has is blocked, or None.
# Built at the composition root (``ssrf.resolving_check``) because the resolver is the HTTP
# stack's, which this layer must not load.
UrlCheck = Callable[[str], Awaitable[str | None]]
# Deliveries a manual retry may requeue; in_flight is on the wire and parked waits for its
# subscription to be enabled again.
RETRYABLE_STATES = (
    model.DeliveryState.PENDING,
    model.DeliveryState.RETRYING,
    model.DeliveryState.DEAD,
    model.DeliveryState.DELIVERED,
    model.DeliveryState.CANCELLED,
)
CANCELLABLE_STATES = (
    model.DeliveryState.PENDING,
    model.DeliveryState.RETRYING,
    model.DeliveryState.PARKED,
)
# States the per-group counters keep (sql/004_metrics.sql); finished work is not counted.
QUEUED_STATES = tuple(
    s.value for s in (*model.ACTIVE_STATES, model.DeliveryState.DEAD, model.DeliveryState.PARKED)
)
# The window of recent attempts the overview and the subscription health figures cover, and
# the most attempts they read: at high rates the window is cut to the newest attempts, so a
# page costs the same at 10 or 10 000 deliveries per second (the answer says so).
RECENT_MINUTES = 15
RECENT_ATTEMPTS_CAP = 10_000
# The newest attempts, walked backwards on the primary key and cut at the cap. Constants in
# the SQL, not parameters: with parameters Postgres switches to a generic plan after five
# runs that misjudges the window and reads every attempt (30 ms became 300+ ms with a
# million attempts, tests/perf/console_pages.py).
_RECENT_ATTEMPTS = f"""
    recent AS MATERIALIZED (
        SELECT delivery_id, started_at, outcome, applied FROM webhook_attempts
        ORDER BY id DESC LIMIT {RECENT_ATTEMPTS_CAP}
    ),
    bounds AS (
        SELECT date_trunc('minute', now()) - interval '{RECENT_MINUTES - 1} minutes' AS since
    )
"""
# The unrouted outbox backlog is counted exactly up to here, then shown as "more than".
BACKLOG_CAP = 10_000


class ManagementError(Exception):
    """An operation the caller asked for cannot be done; ``code`` is machine-readable."""

    code = "error"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class NotFound(ManagementError):
    code = "not_found"


class Conflict(ManagementError):
    code = "conflict"


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    # The key of the last item when more may follow, else None.
    next_key: tuple[Any, ...] | None


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryFilter:
    subscription_id: uuid.UUID | None = None
    state: str | None = None
    event_type: str | None = None
    created_after: datetime.datetime | None = None
    created_before: datetime.datetime | None = None


# Columns a subscription update may set → SQL cast. Fixed names only: never user input.
_UPDATABLE: dict[str, str] = {
    "url": "",
    "event_types": "",
    "headers": "::jsonb",
    "signature_header": "",
    "signers": "",
    "max_in_flight": "",
    "rate_limit_per_second": "",
    "retry_policy": "::jsonb",
    "description": "",
    "metadata": "::jsonb",
}
_JSON_COLUMNS = frozenset({"headers", "retry_policy", "metadata"})

# The repository's subscription columns plus the endpoint-health ones (sql/005_reliability.sql).
# A pause that has run out is no pause (the claim ignores it), so it reads as null here too.
SUBSCRIPTION_COLUMNS = (
    repository.SUBSCRIPTION_COLUMNS
    + """,
    CASE WHEN paused_until > now() THEN paused_until END AS paused_until,
    CASE WHEN paused_until > now() THEN paused_reason END AS paused_reason,
    failing_since, last_success_at
"""
)
# What a subscription that has never been attempted reports (a fresh row's health columns).
NO_HEALTH: dict[str, Any] = {
    "paused_until": None,
    "paused_reason": None,
    "failing_since": None,
    "last_success_at": None,
}

_DELIVERY_COLUMNS = """
    d.id, d.subscription_id, d.state, d.attempt, d.next_attempt_at, d.last_status, d.last_error,
    d.ordering_key, d.manual_replay, d.event_created_at, d.created_at, d.updated_at,
    d.finished_at, o.event_id, o.event_type
"""


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def subscription_dict(row: Any) -> dict[str, Any]:
    """A row selected with :data:`SUBSCRIPTION_COLUMNS` → the API's subscription (no secret)."""
    return {
        **repository.subscription_dict(row),
        "paused_until": _iso(row["paused_until"]),
        "paused_reason": row["paused_reason"],
        "failing_since": _iso(row["failing_since"]),
        "last_success_at": _iso(row["last_success_at"]),
    }


def subscription_event_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "kind": row["kind"],
        "reason": row["reason"],
        "source": row["source"],
        "at": _iso(row["at"]),
    }


def delivery_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "subscription_id": str(row["subscription_id"]),
        "state": row["state"],
        "attempts": row["attempt"],
        "next_attempt_at": _iso(row["next_attempt_at"])
        if row["state"] in (model.DeliveryState.PENDING, model.DeliveryState.RETRYING)
        else None,
        "last_status": row["last_status"],
        "last_error": row["last_error"],
        "ordering_key": row["ordering_key"],
        "manual_retry_pending": row["manual_replay"],
        "event_created_at": _iso(row["event_created_at"]),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "finished_at": _iso(row["finished_at"]),
    }


def attempt_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "attempt": row["attempt"],
        "manual": row["manual"],
        "started_at": _iso(row["started_at"]),
        "duration_ms": row["duration_ms"],
        "outcome": row["outcome"],
        "status_code": row["status_code"],
        "error": row["error"],
        "response_body": row["response_body"],
        "worker": row["worker"],
        "applied": row["applied"],
    }


def event_dict(row: Any) -> dict[str, Any]:
    return {
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "payload": orjson.loads(row["payload"]),
        "subscription_id": str(row["subscription_id"]) if row["subscription_id"] else None,
        "ordering_key": row["ordering_key"],
        "created_at": _iso(row["created_at"]),
        "routed_at": _iso(row["routed_at"]),
        "route_result": row["route_result"],
        "delivery_count": row["delivery_count"],
    }


class Management:
    """Management operations over an asyncpg pool; ``repo`` supplies the shared statements."""

    def __init__(
        self,
        pool: Any,
        repo: repository.Repository | None = None,
        *,
        check_url: UrlCheck | None = None,
    ) -> None:
        self.pool = pool
        self.repo = repo or repository.Repository(pool)
        # Without one (tools and tests that only read) a URL is judged by its text alone.
        self._check_url = check_url

    async def _check_resolved(self, url: str) -> None:
        if self._check_url is None:
            return
        reason = await self._check_url(url)
        if reason is not None:
            raise validation.ValidationError("blocked_url", "url", reason)

    @staticmethod
    def _check_scheme(secret: str, signature_header: str | None, field: str) -> None:
        try:
            signing.check_secret_scheme(secret, signature_header)
        except signing.SigningError as exc:
            raise validation.ValidationError("invalid_secret", field, str(exc)) from None

    # -- subscriptions ---------------------------------------------------------------------

    async def create_subscription(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``spec`` is a validated create request; the result includes the secret."""
        self._check_scheme(spec["secret"], spec.get("signature_header"), "secret")
        await self._check_resolved(spec["url"])
        created = await self.repo.create_subscription(**spec)
        secret = created.pop("secret")
        return {**created, **NO_HEALTH, "secret": secret}

    async def list_subscriptions(
        self,
        *,
        limit: int,
        after: tuple[datetime.datetime, uuid.UUID] | None = None,
        enabled: bool | None = None,
        event_type: str | None = None,
        search: str | None = None,
    ) -> Page:
        """``search``: case-insensitive substring of the id, URL or description."""
        # Oldest first on (created_at, id); plain read, no locks. strpos, not LIKE: the search
        # text needs no escaping of % and _.
        rows = await self.pool.fetch(
            f"""
            SELECT {SUBSCRIPTION_COLUMNS}
            FROM webhook_subscriptions
            WHERE ($1::timestamptz IS NULL OR (created_at, id) > ($1, $2::uuid))
              AND ($3::boolean IS NULL OR enabled = $3)
              AND ($4::text IS NULL OR $4 = ANY (event_types))
              AND ($6::text IS NULL
                   OR strpos(lower(id::text || ' ' || url || ' ' || description), lower($6)) > 0)
            ORDER BY created_at, id
            LIMIT $5
            """,
            after[0] if after else None,
            after[1] if after else None,
            enabled,
            event_type,
            limit + 1,
            search,
        )
        items = [subscription_dict(r) for r in rows[:limit]]
        more = len(rows) > limit
        last = rows[limit - 1] if more else None
        return Page(items, (last["created_at"], last["id"]) if last is not None else None)

    async def get_subscription(self, subscription_id: uuid.UUID) -> dict[str, Any]:
        # Plain read.
        row = await self.pool.fetchrow(
            f"SELECT {SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE id = $1",
            subscription_id,
        )
        if row is None:
            raise NotFound(f"subscription {subscription_id} does not exist")
        return subscription_dict(row)

    async def update_subscription(
        self, subscription_id: uuid.UUID, changes: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Set the given columns in one statement (all or nothing)."""
        if not changes:
            return await self.get_subscription(subscription_id)
        if "url" in changes:
            await self._check_resolved(changes["url"])
        if "signature_header" in changes and not changes["signature_header"]:
            # Plain read: a plain secret cannot lose the only header it signs.
            stored = await self.pool.fetchval(
                "SELECT secret FROM webhook_subscriptions WHERE id = $1", subscription_id
            )
            # A secret this process cannot open is left to the sender (it parks, with reason).
            if stored is not None:
                with contextlib.suppress(secretbox.SecretBoxError):
                    self._check_scheme(self.repo.box.open(stored), None, "signature_header")
        sets = []
        args: list[Any] = [subscription_id]
        for column, value in changes.items():
            cast = _UPDATABLE[column]
            if column == "headers":
                args.append(await self._headers_to_store(subscription_id, value))
            else:
                args.append(orjson.dumps(value).decode() if column in _JSON_COLUMNS else value)
            sets.append(f"{column} = ${len(args)}{cast}")
        if "rate_limit_per_second" in changes:
            # A new limit starts from a full bucket.
            sets.append("rate_tokens = NULL, rate_refilled_at = NULL")
        # Row lock (UPDATE) waits for a claim in progress on this subscription.
        row = await self.pool.fetchrow(
            f"""
            UPDATE webhook_subscriptions SET {", ".join(sets)}, updated_at = now()
            WHERE id = $1
            RETURNING {SUBSCRIPTION_COLUMNS}
            """,
            *args,
        )
        if row is None:
            raise NotFound(f"subscription {subscription_id} does not exist")
        return subscription_dict(row)

    async def _headers_to_store(
        self, subscription_id: uuid.UUID, headers: dict[str, str] | None
    ) -> str:
        """Sealed JSON for an update's headers. Reads show values masked, so a client that
        sends a read back unchanged sends the mask: that keeps the stored value of the header
        of that name instead of storing the mask."""
        headers = headers or {}
        kept = [name for name, value in headers.items() if value == repository.MASKED_HEADER_VALUE]
        if not kept:
            return repository.sealed_headers(self.repo.box, headers)
        # Plain read: the UPDATE that follows takes the row lock.
        stored_text = await self.pool.fetchval(
            "SELECT headers::text FROM webhook_subscriptions WHERE id = $1", subscription_id
        )
        stored: dict[str, str] = orjson.loads(stored_text) if stored_text else {}
        for name in kept:
            if name not in stored:
                raise validation.ValidationError(
                    "invalid_value",
                    f"headers.{name}",
                    "the masked value keeps a stored header; this subscription has none by "
                    "that name",
                )
        fresh = {n: v for n, v in headers.items() if n not in kept}
        sealed: dict[str, str] = orjson.loads(repository.sealed_headers(self.repo.box, fresh))
        sealed.update({name: stored[name] for name in kept})
        return orjson.dumps(sealed).decode()

    async def enable_subscription(self, subscription_id: uuid.UUID) -> dict[str, Any]:
        await self.get_subscription(subscription_id)
        await self.repo.enable_subscription(str(subscription_id))
        return await self.get_subscription(subscription_id)

    async def disable_subscription(self, subscription_id: uuid.UUID, reason: str) -> dict[str, Any]:
        await self.get_subscription(subscription_id)
        await self.repo.disable_subscription(str(subscription_id), reason)
        return await self.get_subscription(subscription_id)

    async def delete_subscription(self, subscription_id: uuid.UUID) -> None:
        # Deliveries and attempts go with it (ON DELETE CASCADE); an ack arriving for a
        # deleted delivery is dropped by the ack statement.
        deleted = await self.pool.fetchval(
            "DELETE FROM webhook_subscriptions WHERE id = $1 RETURNING id", subscription_id
        )
        if deleted is None:
            raise NotFound(f"subscription {subscription_id} does not exist")

    async def rotate_secret(
        self, subscription_id: uuid.UUID, new_secret: str, grace_seconds: float
    ) -> dict[str, Any]:
        """The current secret keeps signing (alongside the new one) for ``grace_seconds``.
        A rotation during a grace period drops the oldest secret."""
        # Plain read: the new secret must fit the scheme the subscription signs with.
        header = await self.pool.fetchrow(
            "SELECT signature_header FROM webhook_subscriptions WHERE id = $1", subscription_id
        )
        if header is not None:
            self._check_scheme(new_secret, header["signature_header"], "secret")
        # Row lock (UPDATE): a claim in progress finishes with the old pair first. The old
        # value moves over as stored (sealed or not).
        row = await self.pool.fetchrow(
            f"""
            UPDATE webhook_subscriptions
            SET previous_secret = CASE WHEN $3 > 0 THEN secret END,
                previous_secret_until = CASE WHEN $3 > 0
                                             THEN now() + make_interval(secs => $3) END,
                secret = $2,
                updated_at = now()
            WHERE id = $1
            RETURNING {SUBSCRIPTION_COLUMNS}
            """,
            subscription_id,
            # Stored sealed when DISPATCHER_SECRET_KEYS is set; shown to the caller in clear.
            self.repo.box.seal(new_secret),
            float(grace_seconds),
        )
        if row is None:
            raise NotFound(f"subscription {subscription_id} does not exist")
        return {**subscription_dict(row), "secret": new_secret}

    async def list_subscription_events(
        self, subscription_id: uuid.UUID, *, limit: int, before_id: int | None = None
    ) -> Page:
        """The subscription's health/audit trail (``webhook_subscription_events``: disabled,
        enabled, paused, resumed, with reason and source), newest first, keyset on id. The
        trail outlives a deleted subscription, so it is served as long as either exists."""
        # Plain reads; the (subscription_id, id) index serves both.
        rows = await self.pool.fetch(
            """
            SELECT id, kind, reason, source, at FROM webhook_subscription_events
            WHERE subscription_id = $1 AND ($2::bigint IS NULL OR id < $2)
            ORDER BY id DESC
            LIMIT $3
            """,
            subscription_id,
            before_id,
            limit + 1,
        )
        if not rows:
            known = await self.pool.fetchval(
                """
                SELECT EXISTS (SELECT 1 FROM webhook_subscriptions WHERE id = $1)
                    OR EXISTS (SELECT 1 FROM webhook_subscription_events
                               WHERE subscription_id = $1)
                """,
                subscription_id,
            )
            if not known:
                raise NotFound(f"subscription {subscription_id} does not exist")
        items = [subscription_event_dict(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, (rows[limit - 1]["id"],) if more else None)

    async def send_test_event(
        self, subscription_id: uuid.UUID, payload: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Publish a ``dispatcher.test`` event addressed to this subscription only."""
        async with self.pool.acquire() as conn, conn.transaction():
            # FOR SHARE: the subscription cannot be disabled or deleted until we commit.
            enabled = await conn.fetchval(
                "SELECT enabled FROM webhook_subscriptions WHERE id = $1 FOR SHARE",
                subscription_id,
            )
            if enabled is None:
                raise NotFound(f"subscription {subscription_id} does not exist")
            if not enabled:
                raise Conflict(
                    f"subscription {subscription_id} is disabled; enable it first",
                    code="subscription_disabled",
                )
            # dispatcher.* types are reserved to the dispatcher (sql/011); this one is its own.
            await conn.execute(operational.EMITTING_SQL)
            event_id = await outbox.insert(
                conn,
                TEST_EVENT_TYPE,
                orjson.dumps(dict(payload)).decode(),
                subscription_id=subscription_id,
                ordering_key=None,
                event_id=None,
            )
        return {"event_id": event_id, "event_type": TEST_EVENT_TYPE}

    async def subscription_stats(
        self, subscription_ids: Sequence[uuid.UUID]
    ) -> dict[str, dict[str, int]]:
        """Per subscription id: queued work by state (``in_flight``, ``dead``, …) and the
        attempts and failures of the last ``RECENT_MINUTES``, among the newest
        ``RECENT_ATTEMPTS_CAP`` (zeros where there are none)."""
        async with self.pool.acquire() as conn:
            # Plain reads, no locks. Depth sums the per-group deltas (sql/004_metrics.sql); the
            # window finds each recent attempt's subscription by primary key. Both cover every
            # subscription and take no parameters (see _RECENT_ATTEMPTS).
            depth = await conn.fetch(
                """
                SELECT subscription_id, state, sum(delta)::bigint AS n
                FROM webhook_delivery_count_deltas
                GROUP BY subscription_id, state
                """
            )
            window = await conn.fetch(
                f"""
                WITH {_RECENT_ATTEMPTS}
                SELECT d.subscription_id, count(*) AS attempts,
                       count(*) FILTER (WHERE a.outcome <> 'success') AS failed
                FROM recent a JOIN webhook_deliveries d ON d.id = a.delivery_id
                WHERE a.applied AND a.started_at >= (SELECT since FROM bounds)
                GROUP BY d.subscription_id
                """
            )
        out: dict[str, dict[str, int]] = {
            str(sid): dict.fromkeys((*QUEUED_STATES, "attempts", "failed"), 0)
            for sid in subscription_ids
        }
        for row in depth:
            entry = out.get(str(row["subscription_id"]))
            if entry is not None:
                entry[row["state"]] = int(row["n"])
        for row in window:
            entry = out.get(str(row["subscription_id"]))
            if entry is not None:
                entry["attempts"] = int(row["attempts"])
                entry["failed"] = int(row["failed"])
        return out

    async def overview(self) -> dict[str, Any]:
        """Database-wide state at a glance: queued work by state, the oldest undelivered
        event, the unrouted outbox backlog (exact up to ``BACKLOG_CAP``), subscriptions up,
        paused and disabled, and delivered/failed attempts per minute over the last
        ``RECENT_MINUTES`` (at most the newest ``RECENT_ATTEMPTS_CAP``: ``window_cut`` and
        ``window_since`` say what was covered)."""
        async with self.pool.acquire() as conn:
            # Plain reads, no locks; each one is an index probe or a small aggregate.
            depth = await conn.fetch(
                """
                SELECT state, sum(delta)::bigint AS n FROM webhook_delivery_count_deltas
                GROUP BY state
                """
            )
            # One probe of webhook_deliveries_oldest per subscription (a min() over the whole
            # partial index would read every queued row), and its in-flight rows (at most
            # max_in_flight) from webhook_deliveries_in_flight (sql/013_hot_path.sql).
            oldest = await conn.fetchval(
                """
                SELECT min(o.at) FROM webhook_subscriptions s CROSS JOIN LATERAL (
                    SELECT least(
                        (SELECT min(d.event_created_at) FROM webhook_deliveries d
                         WHERE d.subscription_id = s.id AND d.state IN ('pending', 'retrying')),
                        (SELECT min(d.event_created_at) FROM webhook_deliveries d
                         WHERE d.subscription_id = s.id AND d.state = 'in_flight')) AS at
                ) o
                """
            )
            backlog = await conn.fetchval(
                """
                SELECT count(*) FROM (
                    SELECT 1 FROM webhook_outbox WHERE routed_at IS NULL LIMIT $1
                ) x
                """,
                BACKLOG_CAP + 1,
            )
            subs = await conn.fetchrow(
                """
                SELECT count(*) FILTER (WHERE enabled AND paused_until IS NULL
                                           OR enabled AND paused_until <= now()) AS up,
                       count(*) FILTER (WHERE enabled AND paused_until > now()) AS paused,
                       count(*) FILTER (WHERE NOT enabled) AS disabled
                FROM webhook_subscriptions
                """
            )
            # One row per minute with attempts, or one row with a null minute when none; the
            # window's start, how many attempts were read and the oldest of them on each.
            rows = await conn.fetch(
                f"""
                WITH {_RECENT_ATTEMPTS}
                SELECT b.since, (SELECT count(*) FROM recent) AS read,
                       (SELECT min(started_at) FROM recent) AS oldest,
                       m.minute, m.delivered, m.failed
                FROM bounds b LEFT JOIN LATERAL (
                    SELECT date_trunc('minute', started_at) AS minute,
                           count(*) FILTER (WHERE outcome = 'success') AS delivered,
                           count(*) FILTER (WHERE outcome <> 'success') AS failed
                    FROM recent
                    WHERE applied AND started_at >= b.since
                    GROUP BY 1
                ) m ON true
                ORDER BY m.minute
                """
            )
        states = {r["state"]: int(r["n"]) for r in depth}
        window = rows[0]
        minutes = [r for r in rows if r["minute"] is not None]
        # Cut short when the cap was reached by attempts that all fall inside the window.
        cut = window["read"] >= RECENT_ATTEMPTS_CAP and window["oldest"] > window["since"]
        delivered = sum(int(r["delivered"]) for r in minutes)
        failed = sum(int(r["failed"]) for r in minutes)
        return {
            "window_minutes": RECENT_MINUTES,
            "window_since": _iso(window["oldest"] if cut else window["since"]),
            "window_cut": cut,
            "deliveries": {s: states.get(s, 0) for s in QUEUED_STATES},
            "oldest_undelivered_at": _iso(oldest),
            "outbox_backlog": int(backlog),
            "outbox_backlog_capped": int(backlog) > BACKLOG_CAP,
            "subscriptions": {k: int(subs[k]) for k in ("up", "paused", "disabled")},
            "delivered": delivered,
            "failed": failed,
            "success_ratio": delivered / (delivered + failed) if delivered + failed else None,
            "per_minute": [
                {
                    "minute": _iso(r["minute"]),
                    "delivered": int(r["delivered"]),
                    "failed": int(r["failed"]),
                }
                for r in minutes
            ],
        }

    # -- deliveries ------------------------------------------------------------------------

    async def list_deliveries(
        self, filters: DeliveryFilter, *, limit: int, before_id: int | None = None
    ) -> Page:
        # Newest first, keyset on id; plain read. Only the filters given become conditions
        # (fixed fragments, numbered parameters): a "$n IS NULL OR ..." per filter made
        # Postgres's generic plan, used after five runs, ignore the indexes (1 ms became
        # 190 ms with a million deliveries, tests/perf/console_pages.py).
        f = filters
        conditions: list[str] = []
        args: list[Any] = []
        for fragment, value in (
            ("d.id < ${}", before_id),
            ("d.subscription_id = ${}", f.subscription_id),
            ("d.state = ${}", f.state),
            ("o.event_type = ${}", f.event_type),
            ("d.created_at >= ${}", f.created_after),
            ("d.created_at < ${}", f.created_before),
        ):
            if value is not None:
                args.append(value)
                conditions.append(fragment.format(len(args)))
        args.append(limit + 1)
        rows = await self.pool.fetch(
            f"""
            SELECT {_DELIVERY_COLUMNS}
            FROM webhook_deliveries d
            JOIN webhook_outbox o ON o.id = d.outbox_id
            WHERE {" AND ".join(conditions) or "true"}
            ORDER BY d.id DESC
            LIMIT ${len(args)}
            """,
            *args,
        )
        items = [delivery_dict(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, (rows[limit - 1]["id"],) if more else None)

    async def get_delivery(self, delivery_id: int) -> dict[str, Any]:
        row = await self.pool.fetchrow(
            f"""
            SELECT {_DELIVERY_COLUMNS}, o.payload::text AS payload
            FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.outbox_id
            WHERE d.id = $1
            """,
            delivery_id,
        )
        if row is None:
            raise NotFound(f"delivery {delivery_id} does not exist")
        attempts = await self.pool.fetch(
            """
            SELECT id, attempt, manual, started_at, duration_ms, outcome, status_code, error,
                   response_body, worker, applied
            FROM webhook_attempts WHERE delivery_id = $1 ORDER BY id
            """,
            delivery_id,
        )
        out = delivery_dict(row)
        out["payload"] = orjson.loads(row["payload"])
        out["attempt_log"] = [attempt_dict(a) for a in attempts]
        return out

    async def retry_delivery(self, delivery_id: int) -> dict[str, Any]:
        """Queue one delivery for an attempt now, recorded as manual. Keeps its webhook-id
        (the event id); the attempt gets a fresh timestamp and signature when sent."""
        async with self.pool.acquire() as conn, conn.transaction():
            # FOR UPDATE waits for an ack or a claim on this row; then we judge its state.
            row = await conn.fetchrow(
                """
                SELECT d.state, s.enabled
                FROM webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id
                WHERE d.id = $1
                FOR UPDATE OF d
                """,
                delivery_id,
            )
            if row is None:
                raise NotFound(f"delivery {delivery_id} does not exist")
            if not row["enabled"] or row["state"] == model.DeliveryState.PARKED:
                raise Conflict(
                    "the delivery's subscription is disabled; enable it first",
                    code="subscription_disabled",
                )
            if row["state"] not in RETRYABLE_STATES:
                raise Conflict(
                    f"delivery {delivery_id} is {row['state']}; wait for the attempt to finish",
                    code="delivery_in_flight",
                )
            await conn.execute(_REQUEUE_SQL, [delivery_id])
            await conn.execute("SELECT pg_notify($1, '')", repository.WORK_CHANNEL)
        return await self.get_delivery(delivery_id)

    async def retry_dead(
        self,
        subscription_id: uuid.UUID,
        since: datetime.datetime,
        *,
        batch: int = 500,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Requeue, as manual attempts, the subscription's deliveries that died at or after
        ``since``. Works in batches (each its own transaction) over the ids that were dead
        when it started, so a replay that dies again is not picked up a second time.
        ``on_progress(done, total)`` is called after each batch."""
        async with self.pool.acquire() as conn:
            enabled = await conn.fetchval(
                "SELECT enabled FROM webhook_subscriptions WHERE id = $1", subscription_id
            )
            if enabled is None:
                raise NotFound(f"subscription {subscription_id} does not exist")
            if not enabled:
                raise Conflict(
                    f"subscription {subscription_id} is disabled; enable it first",
                    code="subscription_disabled",
                )
            # Snapshot of the work: its size (for progress) and its upper id bound.
            bounds = await conn.fetchrow(
                """
                SELECT count(*) AS total, max(id) AS last_id FROM webhook_deliveries
                WHERE subscription_id = $1 AND state = 'dead' AND finished_at >= $2
                """,
                subscription_id,
                since,
            )
            total, last_id = int(bounds["total"]), bounds["last_id"]
            done, after = 0, 0
            while last_id is not None and after < last_id:
                async with conn.transaction():
                    # SKIP LOCKED: a row an ack holds right now is not dead anyway.
                    ids = await conn.fetchval(
                        """
                        SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM (
                            SELECT id FROM webhook_deliveries
                            WHERE subscription_id = $1 AND state = 'dead' AND finished_at >= $2
                              AND id > $3 AND id <= $4
                            ORDER BY id LIMIT $5
                            FOR UPDATE SKIP LOCKED
                        ) x
                        """,
                        subscription_id,
                        since,
                        after,
                        last_id,
                        batch,
                    )
                    if not ids:
                        break
                    await conn.execute(_REQUEUE_SQL, ids)
                    await conn.execute("SELECT pg_notify($1, '')", repository.WORK_CHANNEL)
                done += len(ids)
                after = ids[-1]
                if on_progress is not None:
                    on_progress(done, total)
        return {
            "subscription_id": str(subscription_id),
            "since": since.isoformat(),
            "retried": done,
        }

    async def cancel_delivery(self, delivery_id: int) -> dict[str, Any]:
        # Row lock (UPDATE) waits for a claim or ack in progress, then re-checks the state.
        updated = await self.pool.fetchval(
            """
            UPDATE webhook_deliveries
            SET state = 'cancelled', finished_at = now(), manual_replay = false,
                updated_at = now()
            WHERE id = $1 AND state = ANY ($2::text[])
            RETURNING id
            """,
            delivery_id,
            [state.value for state in CANCELLABLE_STATES],
        )
        if updated is None:
            state = await self.pool.fetchval(
                "SELECT state FROM webhook_deliveries WHERE id = $1", delivery_id
            )
            if state is None:
                raise NotFound(f"delivery {delivery_id} does not exist")
            raise Conflict(
                f"delivery {delivery_id} is {state}; only pending, retrying or parked "
                "deliveries can be cancelled",
                code="delivery_not_cancellable",
            )
        return await self.get_delivery(delivery_id)

    # -- events ----------------------------------------------------------------------------

    async def get_event(self, event_id: str) -> dict[str, Any]:
        row = await self.pool.fetchrow(
            """
            SELECT id, event_id, event_type, payload::text AS payload, subscription_id,
                   ordering_key, created_at, routed_at, route_result, delivery_count
            FROM webhook_outbox WHERE event_id = $1
            """,
            event_id,
        )
        if row is None:
            raise NotFound(f"event {event_id} does not exist")
        deliveries = await self.pool.fetch(
            f"""
            SELECT {_DELIVERY_COLUMNS}
            FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.outbox_id
            WHERE d.outbox_id = $1 ORDER BY d.id
            """,
            row["id"],
        )
        out = event_dict(row)
        out["deliveries"] = [delivery_dict(d) for d in deliveries]
        return out

    async def list_unrouted_events(self, *, limit: int, before_id: int | None = None) -> Page:
        """Events that reached no subscription (route_result other than 'routed'), newest
        first. Uses the partial index from 001."""
        rows = await self.pool.fetch(
            """
            SELECT id, event_id, event_type, payload::text AS payload, subscription_id,
                   ordering_key, created_at, routed_at, route_result, delivery_count
            FROM webhook_outbox
            WHERE route_result <> 'routed' AND ($1::bigint IS NULL OR id < $1)
            ORDER BY id DESC
            LIMIT $2
            """,
            before_id,
            limit + 1,
        )
        items = [event_dict(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, (rows[limit - 1]["id"],) if more else None)


_REQUEUE_SQL = """
-- Callers hold the row locks. The attempt counter is kept, so a replay of a delivery that
-- used up its attempts gets exactly one try before it is dead again.
UPDATE webhook_deliveries
SET state = 'pending', next_attempt_at = now(), manual_replay = true, finished_at = NULL,
    updated_at = now()
WHERE id = ANY ($1::bigint[])
"""
