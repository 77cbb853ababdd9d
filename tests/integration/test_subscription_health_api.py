"""Endpoint health where operators look: the subscription's health fields in the admin API,
its audit trail at ``GET /v1/subscriptions/{id}/events`` (and ``dispatcher subscriptions
events``), and ``dispatcher_subscription_up`` reading the circuit breaker's pause."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from typing import Any

import orjson
import prometheus_client as prom

from dispatcher import gauges, metrics
from tests import support
from tests.integration.api_support import Client, api, problem

__all__ = ["api"]  # the fixture, imported for pytest

HEALTH_FIELDS = ("paused_until", "paused_reason", "failing_since", "last_success_at")


async def _create(api: Client, url: str = "http://127.0.0.1:9/hook") -> dict[str, Any]:
    reply = await api.post("/subscriptions", {"url": url, "event_types": ["order.*"]})
    assert reply.status == 201, reply
    return dict(reply.body)


def _at(text: str | None) -> datetime.datetime:
    assert text is not None
    return datetime.datetime.fromisoformat(text)


async def _pause(pool: Any, sid: str, reason: str, *, seconds: float = 300) -> None:
    # What health.Monitor writes on a breaker trip; the audit trigger records it.
    await pool.execute(
        """
        UPDATE webhook_subscriptions
        SET paused_until = now() + make_interval(secs => $2), paused_reason = $3,
            pause_count = pause_count + 1
        WHERE id = $1
        """,
        uuid.UUID(sid),
        seconds,
        reason,
    )


async def test_subscription_endpoints_show_health(api: Client, pool: Any) -> None:
    created = await _create(api)
    sid = created["id"]
    assert {f: created[f] for f in HEALTH_FIELDS} == dict.fromkeys(HEALTH_FIELDS)

    await _pause(pool, sid, "circuit breaker: 5 of 5 attempts failed")
    await pool.execute(
        """
        UPDATE webhook_subscriptions
        SET failing_since = now() - interval '1 hour', last_success_at = now() - interval '2 hours'
        WHERE id = $1
        """,
        uuid.UUID(sid),
    )
    got = (await api.get(f"/subscriptions/{sid}")).body
    now = datetime.datetime.now(datetime.UTC)
    assert _at(got["paused_until"]) > now
    assert got["paused_reason"] == "circuit breaker: 5 of 5 attempts failed"
    assert _at(got["last_success_at"]) < _at(got["failing_since"]) < now
    listed = (await api.get("/subscriptions")).body["items"]
    assert [{f: s[f] for f in HEALTH_FIELDS} for s in listed] == [
        {f: got[f] for f in HEALTH_FIELDS}
    ]
    # Every other route that answers with the subscription carries them too.
    updated = (await api.patch(f"/subscriptions/{sid}", {"description": "x"})).body
    rotated = (await api.post(f"/subscriptions/{sid}/rotate-secret", {})).body
    disabled = (await api.post(f"/subscriptions/{sid}/disable", {"reason": "r"})).body
    for body in (updated, rotated, disabled):
        assert body["failing_since"] == got["failing_since"], body

    # A pause that has run out is no pause (the claim ignores it): shown as null.
    await pool.execute(
        "UPDATE webhook_subscriptions SET paused_until = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(sid),
    )
    expired = (await api.get(f"/subscriptions/{sid}")).body
    assert (expired["paused_until"], expired["paused_reason"]) == (None, None)
    # Enabling resets the health record (trigger in sql/005_reliability.sql).
    enabled = (await api.post(f"/subscriptions/{sid}/enable")).body
    assert enabled["failing_since"] is None
    assert enabled["last_success_at"] == got["last_success_at"]


async def test_events_newest_first_with_cursor(api: Client, pool: Any) -> None:
    sid = (await _create(api))["id"]
    other = (await _create(api))["id"]
    assert (await api.post(f"/subscriptions/{sid}/disable", {"reason": "maintenance"})).status
    assert (await api.post(f"/subscriptions/{sid}/enable")).status == 200
    await _pause(pool, sid, "circuit breaker: 3 of 4 attempts failed")
    await _pause(pool, other, "not this one")

    whole = await api.get(f"/subscriptions/{sid}/events")
    assert whole.status == 200, whole
    assert whole.body["next_cursor"] is None
    items = whole.body["items"]
    assert [(e["kind"], e["reason"]) for e in items] == [
        ("paused", "circuit breaker: 3 of 4 attempts failed"),
        ("enabled", "enabled"),
        ("disabled", "maintenance"),
    ]
    # Made through the API (the dispatcher's pool) vs. by hand here (the test's pool).
    assert [e["source"] for e in items[1:]] == ["dispatcher", "dispatcher"]
    ids = [e["id"] for e in items]
    assert ids == sorted(ids, reverse=True)
    assert _at(items[0]["at"]) >= _at(items[-1]["at"])

    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2"} if cursor is None else {"limit": "2", "cursor": cursor}
        page = await api.get(f"/subscriptions/{sid}/events", **params)
        assert page.status == 200, page
        pages += page.body["items"]
        cursor = page.body["next_cursor"]
        if cursor is None:
            break
    assert pages == items

    # The trail outlives the subscription (no foreign key): still served after a delete.
    assert (await api.delete(f"/subscriptions/{sid}")).status == 204
    problem(await api.get(f"/subscriptions/{sid}"), 404, "not_found")
    assert (await api.get(f"/subscriptions/{sid}/events")).body["items"] == items


async def test_events_errors_and_auth(api: Client) -> None:
    sid = (await _create(api))["id"]
    empty = await api.get(f"/subscriptions/{sid}/events")
    assert (empty.status, empty.body) == (200, {"items": [], "next_cursor": None})
    problem(await api.get(f"/subscriptions/{uuid.uuid4()}/events"), 404, "not_found")
    problem(await api.get("/subscriptions/not-a-uuid/events"), 404, "not_found")
    problem(await api.get(f"/subscriptions/{sid}/events", limit="0"), 400, "out_of_range", "limit")
    problem(
        await api.get(f"/subscriptions/{sid}/events", cursor="bm9wZQ"),
        400,
        "invalid_cursor",
        "cursor",
    )
    # A cursor from another listing is refused too.
    deliveries_cursor = "eyJrIjoiZGVsaXZlcmllcyIsInYiOlsiNSJdfQ"
    problem(
        await api.get(f"/subscriptions/{sid}/events", cursor=deliveries_cursor),
        400,
        "invalid_cursor",
    )
    problem(await api.with_token(None).get(f"/subscriptions/{sid}/events"), 401, "unauthorized")
    problem(await api.with_token("wrong").get(f"/subscriptions/{sid}/events"), 401, "unauthorized")


async def _cli(dsn: str, *args: str) -> tuple[int, str, str]:
    done = await support.run_cli(support.cli_env(dsn, DISPATCHER_LOG_FORMAT="json"), *args)
    return done.code, done.out, done.err


async def test_cli_mirrors_the_events_route(api: Client, pool: Any, dsn: str) -> None:
    sid = (await _create(api))["id"]
    assert (await api.post(f"/subscriptions/{sid}/disable", {"reason": "noisy"})).status == 200
    assert (await api.post(f"/subscriptions/{sid}/enable")).status == 200
    await _pause(pool, sid, "breaker")
    served = (await api.get(f"/subscriptions/{sid}/events")).body

    (code, out, err), (tcode, table, _), (mcode, _, missing) = await asyncio.gather(
        _cli(dsn, "subscriptions", "events", sid, "--json", "--limit", "1", "--all"),
        _cli(dsn, "subscriptions", "events", sid),
        _cli(dsn, "subscriptions", "events", str(uuid.uuid4())),
    )
    assert code == 0, err
    assert orjson.loads(out) == served
    assert tcode == 0
    lines = table.splitlines()
    assert lines[0].split() == ["AT", "KIND", "REASON", "SOURCE"]
    assert [line.split()[1] for line in lines[1:]] == ["paused", "enabled", "disabled"]
    assert mcode == 2, missing
    assert "does not exist [not_found]" in missing, missing


async def test_subscription_up_is_zero_while_paused(pool: Any) -> None:
    ids = [str(uuid.uuid4()) for _ in range(4)]
    await pool.execute(
        """
        INSERT INTO webhook_subscriptions (id, url, event_types, secret, enabled, paused_until)
        SELECT id, 'http://127.0.0.1:9/', '{t.x}', 's', enabled, paused_until
        FROM unnest($1::uuid[], $2::boolean[], $3::timestamptz[]) AS u(id, enabled, paused_until)
        """,
        ids,
        [True, True, True, False],
        [
            None,  # healthy
            datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5),  # paused
            datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5),  # pause over
            None,  # disabled
        ],
    )
    registry = prom.CollectorRegistry()
    loop = gauges.GaugeLoop(pool, metrics.Metrics(registry), interval_seconds=1)
    await loop.refresh()
    up = [
        registry.get_sample_value("dispatcher_subscription_up", {"subscription": sid})
        for sid in ids
    ]
    assert up == [1, 0, 1, 0]
