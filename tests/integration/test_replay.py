"""Replay: a dead-lettered delivery replayed through the API arrives again with the same
webhook-id, a fresh timestamp and a valid new signature, and its attempt row says manual."""

from __future__ import annotations

import time
from typing import Any

import standardwebhooks

import dispatcher
from dispatcher import receiver as receiver_toolkit
from tests import support
from tests.integration.api_support import Client, api

__all__ = ["api"]  # the fixture, imported for pytest

SECRET = "whsec_" + "cmVwbGF5LXNlY3JldC0wMTIzNDU2Nzg5"


async def _dead_ids(pool: Any, sub: str) -> list[int]:
    rows = await pool.fetch(
        "SELECT id FROM webhook_deliveries WHERE subscription_id = $1 AND state = 'dead' "
        "ORDER BY id",
        sub,
    )
    return [r["id"] for r in rows]


async def test_bulk_replay_of_dead_deliveries(api: Client, pool: Any, make_receiver: Any) -> None:
    target, other = await make_receiver(), await make_receiver()
    for r in (target, other):
        r.respond = lambda _n, _h, _b: (400, {}, 0.0)  # permanent: dead after 2 attempts
    sub = (
        await api.post(
            "/subscriptions", {"url": target.url, "event_types": ["job.*"], "secret": SECRET}
        )
    ).body["id"]
    other_sub = (
        await api.post("/subscriptions", {"url": other.url, "event_types": ["job.*"]})
    ).body["id"]
    async with pool.acquire() as conn:
        old_event = await dispatcher.publish(conn, "job.old", {"n": 0})
    await support.wait_for(lambda: _dead_ids(pool, sub), message="first delivery dead")
    # This one died long ago: outside the replay window.
    await pool.execute(
        "UPDATE webhook_deliveries SET finished_at = now() - interval '2 days' "
        "WHERE subscription_id = $1",
        sub,
    )
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    async with pool.acquire() as conn:
        events = [await dispatcher.publish(conn, "job.done", {"n": i}) for i in (1, 2)]

    async def all_dead() -> bool:
        return len(await _dead_ids(pool, sub)) == 3 and len(await _dead_ids(pool, other_sub)) == 3

    await support.wait_for(all_dead, message="every delivery dead")
    first = {r.headers["webhook-id"]: r for r in target.requests}
    assert set(first) == {old_event, *events}
    tried = len(target.requests)

    # The receiver is fixed; replay what died in the last hour, in a later second than the
    # original attempts so the timestamp is visibly fresh.
    target.respond = lambda _n, _h, _b: (200, {}, 0.0)
    latest = max(int(r.headers["webhook-timestamp"]) for r in target.requests)
    await support.wait_for(lambda: int(time.time()) > latest, message="next second")
    reply = await api.post(f"/subscriptions/{sub}/retry-dead", {"since": since})
    assert reply.status == 200, reply
    assert reply.body["retried"] == 2

    await support.wait_for(lambda: len(target.ok()) == 2, message="replays arrive")
    replays = target.ok()
    assert sorted(r.headers["webhook-id"] for r in replays) == sorted(events)
    verifier = standardwebhooks.Webhook(SECRET)
    for replay in replays:
        original = first[replay.headers["webhook-id"]]
        assert replay.body == original.body
        assert int(replay.headers["webhook-timestamp"]) > int(original.headers["webhook-timestamp"])
        assert replay.headers["webhook-signature"] != original.headers["webhook-signature"]
        verifier.verify(replay.body, replay.headers)
        receiver_toolkit.verify_standard(SECRET, replay.headers, replay.body)
    assert len(target.requests) == tried + 2  # the old one and the other subscription: no

    async def recorded() -> list[Any]:
        rows = await pool.fetch(
            "SELECT a.attempt, a.manual, a.status_code, d.state, d.manual_replay "
            "FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id "
            "JOIN webhook_outbox o ON o.id = d.outbox_id "
            "WHERE o.event_id = ANY($1) AND a.manual",
            events,
        )
        return rows if len(rows) == 2 else []

    rows = await support.wait_for(recorded, message="manual attempts recorded")
    assert {(r["attempt"], r["manual"], r["status_code"]) for r in rows} == {(3, True, 200)}
    assert all(r["state"] == "delivered" and not r["manual_replay"] for r in rows)
    assert await pool.fetchval("SELECT count(*) FROM webhook_attempts WHERE manual") == 2
    assert len(other.requests) == 6  # 3 events x 2 attempts, none replayed
    assert len(await _dead_ids(pool, other_sub)) == 3
