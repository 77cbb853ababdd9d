"""GET /v1/overview and the subscription figures the console shows: counted from the real
tables, and bounded in what they read when attempts arrive faster than the cap."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from dispatcher.db import management
from tests.integration.api_support import Client, api  # noqa: F401 (fixture)


async def _delivery(pool: Any, state: str = "delivered") -> tuple[uuid.UUID, int]:
    sid = await pool.fetchval(
        "INSERT INTO webhook_subscriptions (url, event_types, secret) "
        "VALUES ('http://127.0.0.1:9/', '{a.b}', 's') RETURNING id"
    )
    outbox = await pool.fetchval(
        # Routed already, and (below) not due: the running dispatcher leaves them alone.
        "INSERT INTO webhook_outbox (event_type, payload, routed_at, route_result) "
        "VALUES ('a.b', '{}', now(), 'routed') RETURNING id"
    )
    did = await pool.fetchval(
        "INSERT INTO webhook_deliveries (outbox_id, subscription_id, event_created_at, state, "
        "next_attempt_at) VALUES ($1, $2, now(), $3, now() + interval '1 day') RETURNING id",
        outbox,
        sid,
        state,
    )
    return sid, did


async def _attempts(pool: Any, did: int, outcome: str, n: int, age_seconds: float = 0) -> None:
    await pool.execute(
        """
        INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, outcome)
        SELECT $1, 1, now() - make_interval(secs => $4), 1, $2 FROM generate_series(1, $3)
        """,
        did,
        outcome,
        n,
        age_seconds,
    )


async def test_overview_counts_states_subscriptions_and_recent_attempts(
    api: Client,  # noqa: F811
    pool: Any,
) -> None:
    sid, did = await _delivery(pool, "dead")
    await _delivery(pool, "pending")
    await pool.execute(
        "UPDATE webhook_subscriptions SET enabled = false, disabled_reason = 'x' WHERE id = $1",
        sid,
    )
    await _attempts(pool, did, "success", 3)
    await _attempts(pool, did, "http_5xx", 1)
    await _attempts(pool, did, "http_5xx", 5, age_seconds=3600)  # outside the window
    reply = await api.get("/overview")
    assert reply.status == 200
    body = reply.body
    assert body["deliveries"]["dead"] == 1
    assert body["deliveries"]["pending"] == 1
    assert body["subscriptions"] == {"up": 1, "paused": 0, "disabled": 1}
    assert (body["delivered"], body["failed"]) == (3, 1)
    assert body["success_ratio"] == 0.75
    assert body["window_cut"] is False
    assert body["oldest_undelivered_at"] is not None
    assert sum(m["delivered"] + m["failed"] for m in body["per_minute"]) == 4

    stats = await management.Management(pool).subscription_stats([sid, uuid.uuid4()])
    assert stats[str(sid)]["attempts"] == 4
    assert stats[str(sid)]["failed"] == 1
    assert stats[str(sid)]["dead"] == 1


async def test_a_busy_window_is_cut_to_the_newest_attempts_and_says_so(
    api: Client,  # noqa: F811
    pool: Any,
) -> None:
    _, did = await _delivery(pool)
    await _attempts(pool, did, "http_5xx", 10, age_seconds=600)
    await _attempts(pool, did, "success", management.RECENT_ATTEMPTS_CAP, age_seconds=60)
    body = (await api.get("/overview")).body
    assert body["window_cut"] is True
    assert (body["delivered"], body["failed"]) == (management.RECENT_ATTEMPTS_CAP, 0)
    since = datetime.datetime.fromisoformat(body["window_since"])
    assert datetime.datetime.now(datetime.UTC) - since < datetime.timedelta(seconds=300)
