"""Operational events: the dispatcher announces disables, enables, breaker pauses and resumes,
rotations and dead letters through its own outbox, to subscriptions of ``dispatcher.*``, in
the transaction of the change; never about the delivery of an operational event; and past
the per-minute rate, dead letters collapse into one summary. Every payload is checked against
its published JSON Schema (docs/schemas/)."""

from __future__ import annotations

import datetime
import json
import time
import uuid
from typing import Any

import asyncpg
import jsonschema
import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from dispatcher import claimer, config, model, secretbox
from dispatcher.db import management, operational, repository
from dispatcher.db import pool as db_pool
from dispatcher.db import secrets as db_secrets
from tests import support
from tests.integration.test_health import FAST_HEALTH

SCHEMAS = support.ROOT / "docs" / "schemas"
OPS = ("dispatcher.*",)


def check_schema(payload: dict[str, Any]) -> None:
    schema = json.loads((SCHEMAS / f"{payload['type']}.json").read_text())
    jsonschema.validate(payload, schema, format_checker=jsonschema.FormatChecker())


async def operational_events(pool: Any, event_type: str | None = None) -> list[dict[str, Any]]:
    """Operational events in the outbox, oldest first (payload plus ordering key)."""
    rows = await pool.fetch(
        """
        SELECT event_type, ordering_key, payload::text AS payload FROM webhook_outbox
        WHERE starts_with(event_type, 'dispatcher.') AND ($1::text IS NULL OR event_type = $1)
        ORDER BY id
        """,
        event_type,
    )
    out = []
    for r in rows:
        payload = orjson.loads(r["payload"])
        assert payload["type"] == r["event_type"]
        check_schema(payload)
        out.append({**payload, "ordering_key": r["ordering_key"]})
    return out


def received(receiver: support.Receiver, event_type: str) -> list[dict[str, Any]]:
    """Operational events a receiver got, each verified with the independent library."""
    out = []
    for r in receiver.ok():
        body = orjson.loads(r.body)
        if body.get("type") != event_type:
            continue
        Webhook(support.SECRET).verify(r.body, r.headers)
        check_schema(body)
        out.append(body)
    return out


async def settled(pool: Any) -> bool:
    """Everything routed and nothing left to send or retry."""
    return bool(
        await pool.fetchval(
            """
            SELECT NOT EXISTS (SELECT 1 FROM webhook_outbox WHERE routed_at IS NULL)
               AND NOT EXISTS (SELECT 1 FROM webhook_deliveries
                               WHERE state IN ('pending', 'in_flight', 'retrying'))
            """
        )
    )


async def test_a_410_disables_with_exactly_one_event_at_the_operations_subscription(
    pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    ops, target = await make_receiver(), await make_receiver()
    target.respond = lambda _n, _h, _b: (410, {}, 0.0)
    await support.subscribe(pool, ops.url, event_types=OPS)
    sid = await support.subscribe(pool, target.url, event_types=("order.*",), description="orders")
    await support.publish(pool, 3, event_type="order.created")
    await start_dispatcher()

    await support.wait_for(
        lambda: received(ops, "dispatcher.subscription.disabled"),
        message="the disable to reach the operations endpoint",
    )
    await support.wait_for(lambda: settled(pool), message="everything settled")
    [event] = await operational_events(pool)
    assert event["type"] == "dispatcher.subscription.disabled"
    assert event["ordering_key"] == sid
    data = event["data"]
    assert data["subscription_id"] == sid
    assert data["reason"] == "gone"
    assert data["url_host"] == "127.0.0.1"
    assert data["description"] == "orders"
    assert "410" in data["detail"]
    assert len(received(ops, "dispatcher.subscription.disabled")) == 1


async def test_a_breaker_pause_and_its_resume_produce_one_event_each(
    pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    ops, target = await make_receiver(), await make_receiver()
    healthy = {"now": False}
    target.respond = lambda _n, _h, _b: (200 if healthy["now"] else 503, {}, 0.0)
    await support.subscribe(pool, ops.url, event_types=OPS)
    sid = await support.subscribe(pool, target.url, event_types=("order.*",))
    await support.publish(pool, 12, event_type="order.created")
    await start_dispatcher(
        endpoint_health=FAST_HEALTH,
        retry=config.RetryPolicy(
            base_seconds=0.01, cap_seconds=0.05, max_attempts=1000, max_4xx_attempts=2
        ),
    )

    await support.wait_for(
        lambda: operational_events(pool, "dispatcher.subscription.paused"),
        message="the breaker to trip",
    )
    healthy["now"] = True
    await support.wait_for(
        lambda: received(ops, "dispatcher.subscription.resumed"), timeout=15, message="resume"
    )
    await support.wait_for(lambda: settled(pool), message="everything settled")
    events = await operational_events(pool)
    assert [e["type"] for e in events] == [
        "dispatcher.subscription.paused",
        "dispatcher.subscription.resumed",
    ]
    paused, resumed = (e["data"] for e in events)
    assert paused["subscription_id"] == resumed["subscription_id"] == sid
    assert paused["failure_ratio"] >= FAST_HEALTH.breaker_failure_ratio
    assert paused["pause_seconds"] == pytest.approx(FAST_HEALTH.pause_seconds, abs=0.1)
    assert resumed["reason"] == "probe delivered"
    assert len(received(ops, "dispatcher.subscription.paused")) == 1


async def test_a_dead_letter_produces_one_delivery_dead_event_without_the_payload(
    pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    ops, target = await make_receiver(), await make_receiver()
    target.respond = lambda _n, _h, _b: (422, {}, 0.0)
    await support.subscribe(pool, ops.url, event_types=("dispatcher.delivery.dead",))
    sid = await support.subscribe(pool, target.url, event_types=("order.*",))
    [event_id] = await support.publish(
        pool, event_type="order.created", payload=lambda _i: {"card": "4111-secret-payload"}
    )
    await start_dispatcher()

    [got] = await support.wait_for(
        lambda: received(ops, "dispatcher.delivery.dead"), message="the dead letter event"
    )
    await support.wait_for(lambda: settled(pool), message="everything settled")
    delivery_id = await pool.fetchval(
        "SELECT id FROM webhook_deliveries WHERE subscription_id = $1 AND state = 'dead'",
        uuid.UUID(sid),
    )
    assert got["data"] == {
        "delivery_id": delivery_id,
        "event_id": event_id,
        "event_type": "order.created",
        "subscription_id": sid,
        "attempts": 2,  # max_4xx_attempts of the fast settings
        "why": "4xx_rule",
        "last_status": 422,
        "last_error": "HTTP 422 (attempts exhausted (2/2))",
    }
    assert b"4111-secret-payload" not in ops.requests[0].body
    [stored] = await operational_events(pool)
    assert stored["ordering_key"] == str(delivery_id)


async def test_a_failing_operations_endpoint_produces_no_events_about_itself(
    pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    broken, gone, target = await make_receiver(), await make_receiver(), await make_receiver()
    broken.respond = lambda _n, _h, _b: (500, {}, 0.0)
    gone.respond = lambda _n, _h, _b: (410, {}, 0.0)
    target.respond = lambda _n, _h, _b: (400, {}, 0.0)
    broken_sid = await support.subscribe(pool, broken.url, event_types=OPS)
    gone_sid = await support.subscribe(pool, gone.url, event_types=OPS)
    await support.subscribe(pool, target.url, event_types=("order.*",))
    await support.publish(pool, event_type="order.created")
    await start_dispatcher(
        retry=config.RetryPolicy(
            base_seconds=0.01, cap_seconds=0.05, max_attempts=2, max_4xx_attempts=2
        )
    )

    async def both_given_up() -> bool:
        return bool(
            await pool.fetchval(
                """
                SELECT EXISTS (SELECT 1 FROM webhook_deliveries
                               WHERE subscription_id = $1 AND state = 'dead')
                   AND NOT (SELECT enabled FROM webhook_subscriptions WHERE id = $2)
                """,
                uuid.UUID(broken_sid),
                uuid.UUID(gone_sid),
            )
        )

    await support.wait_for(both_given_up, message="both operations endpoints to give up")
    await support.wait_for(lambda: settled(pool), message="everything settled")
    # The target's dead letter, and nothing about the operations endpoints' own failures.
    assert [e["type"] for e in await operational_events(pool)] == ["dispatcher.delivery.dead"]
    assert await pool.fetchval("SELECT count(*) FROM webhook_dead_letter_counts") == 1


async def _dead_at_once(
    dsn: str, pool: Any, sid: str, count: int, *, extra_settings: dict[str, str] | None = None
) -> list[int]:
    """``count`` leased deliveries of ``sid`` die in one ack statement (the real ack path)."""
    rows = await pool.fetch(
        """
        WITH events AS (
            INSERT INTO webhook_outbox (event_type, payload, routed_at, route_result)
            SELECT 'order.created', '{}', now(), 'routed' FROM generate_series(1, $2)
            RETURNING id, created_at
        )
        INSERT INTO webhook_deliveries (outbox_id, subscription_id, event_created_at, state,
                                        attempt, lease_token, leased_until)
        SELECT id, $1, created_at, 'in_flight', 3, nextval('webhook_lease_token_seq'),
               now() + interval '1 minute'
        FROM events
        RETURNING id, lease_token
        """,
        uuid.UUID(sid),
        count,
    )
    now = time.time()
    acks = [
        model.Ack(
            delivery_id=r["id"],
            lease_token=r["lease_token"],
            attempt=3,
            state=model.DeliveryState.DEAD,
            delay_seconds=None,
            status=503,
            error="HTTP 503 (attempts exhausted (3/3))",
            started_at=now,
            duration_ms=1.0,
            outcome=model.Outcome.HTTP_5XX.value,
            response=None,
            manual=False,
        )
        for r in rows
    ]
    ack_pool = await db_pool.create_pool(dsn, max_size=1, extra_settings=extra_settings)
    try:
        applied = await repository.Repository(ack_pool).ack(acks, "test-worker")
    finally:
        await ack_pool.close()
    assert len(applied) == count
    return sorted(r["id"] for r in rows)


async def test_ten_thousand_dead_letters_collapse_past_the_configured_rate(
    dsn: str, pool: Any
) -> None:
    sid = await support.subscribe(pool, event_types=("order.*",))
    ids = await _dead_at_once(
        dsn, pool, sid, 10_000, extra_settings={operational.DEAD_EVENTS_SETTING: "25"}
    )

    dead = await operational_events(pool, "dispatcher.delivery.dead")
    assert [e["data"]["delivery_id"] for e in dead] == ids[:25]
    # The minute is not over: no summary yet, however often the flush runs.
    assert await operational.flush_dead_summaries(pool) == 0
    later = await pool.fetchval("SELECT now() + interval '61 seconds'")
    assert await operational.flush_dead_summaries(pool, later) == 1
    assert await operational.flush_dead_summaries(pool, later) == 0
    [summary] = await operational_events(pool, "dispatcher.deliveries.dead_summary")
    data = summary["data"]
    assert (data["dead"], data["announced"], data["suppressed"]) == (10_000, 25, 9_975)
    assert data["sample_delivery_ids"] == ids[25:35]
    assert data["subscription_id"] == summary["ordering_key"] == sid
    start = datetime.datetime.fromisoformat(data["window_start"])
    assert datetime.datetime.fromisoformat(data["window_end"]) - start == datetime.timedelta(
        minutes=1
    )


async def test_the_default_rate_is_sixty_a_minute_per_subscription(dsn: str, pool: Any) -> None:
    first = await support.subscribe(pool, event_types=("order.*",))
    second = await support.subscribe(pool, event_types=("order.*",))
    await _dead_at_once(dsn, pool, first, 50)
    await _dead_at_once(dsn, pool, first, 50)  # the same minute: 10 more, then the counter
    await _dead_at_once(dsn, pool, second, 61)
    per_sub: dict[str, int] = {}
    for e in await operational_events(pool, "dispatcher.delivery.dead"):
        per_sub[e["data"]["subscription_id"]] = per_sub.get(e["data"]["subscription_id"], 0) + 1
    assert per_sub == {first: 60, second: 60}


async def test_a_rolled_back_disable_or_enable_produces_nothing(pool: Any) -> None:
    sid = uuid.UUID(await support.subscribe(pool, event_types=("order.*",)))

    class Abort(Exception):
        pass

    async def change_then_fail(enabled: bool) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE webhook_subscriptions SET enabled = $2 WHERE id = $1", sid, enabled
            )
            raise Abort

    for enabled in (False, True, False):
        with pytest.raises(Abort):
            await change_then_fail(enabled)
        assert await operational_events(pool) == []
        # Then the same change committed: one event.
        await pool.execute(
            "UPDATE webhook_subscriptions SET enabled = $2 WHERE id = $1", sid, enabled
        )
        kind = "enabled" if enabled else "disabled"
        assert [e["type"] for e in await operational_events(pool)][-1] == (
            f"dispatcher.subscription.{kind}"
        )
        await pool.execute("DELETE FROM webhook_outbox")


async def test_catch_all_subscriptions_do_not_receive_operational_events(
    pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    everything, ops = await make_receiver(), await make_receiver()
    all_sid = await support.subscribe(pool, everything.url, event_types=("*",))
    await support.subscribe(pool, ops.url, event_types=("dispatcher.subscription.*",))
    await repository.Repository(pool).disable_subscription(all_sid, "maintenance")
    await repository.Repository(pool).enable_subscription(all_sid)
    await support.publish(pool, event_type="order.created")
    await start_dispatcher()

    await support.wait_for(lambda: len(ops.ok()) == 2, message="both operational events")
    await support.wait_for(lambda: settled(pool), message="everything settled")
    assert [orjson.loads(r.body)["i"] for r in everything.ok()] == [0]
    [disabled] = received(ops, "dispatcher.subscription.disabled")
    assert disabled["data"]["reason"] == "operator"
    assert disabled["data"]["detail"] == "maintenance"


async def test_the_summary_of_a_finished_minute_reaches_the_operations_endpoint(
    dsn: str, pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    ops = await make_receiver()
    await support.subscribe(pool, ops.url, event_types=("dispatcher.deliveries.*",))
    sid = await support.subscribe(pool, event_types=("order.*",))
    # Rate 0: every dead letter is left to the summary.
    ids = await _dead_at_once(
        dsn, pool, sid, 3, extra_settings={operational.DEAD_EVENTS_SETTING: "0"}
    )
    # The minute passes (its row moved one minute back, instead of waiting for the clock).
    await pool.execute(
        "UPDATE webhook_dead_letter_counts SET minute = minute - interval '1 minute'"
    )
    await start_dispatcher()

    [summary] = await support.wait_for(
        lambda: received(ops, "dispatcher.deliveries.dead_summary"), message="the summary"
    )
    assert summary["data"]["sample_delivery_ids"] == ids
    assert (summary["data"]["dead"], summary["data"]["suppressed"]) == (3, 3)
    assert await operational_events(pool, "dispatcher.delivery.dead") == []


async def test_reencrypting_a_secret_is_not_a_rotation(pool: Any) -> None:
    sid = await support.subscribe(pool, event_types=("order.*",))
    box = secretbox.SecretBox.from_spec(f"k1:{secretbox.generate_key()}")
    assert (await db_secrets.reencrypt(pool, box)).resealed == 1
    assert await operational_events(pool) == []
    await management.Management(pool, repository.Repository(pool, box=box)).rotate_secret(
        uuid.UUID(sid), support.SECRET, 60
    )
    [rotated] = await operational_events(pool)
    assert rotated["type"] == "dispatcher.subscription.secret_rotated"
    assert rotated["data"]["previous_secret_valid_until"] is not None


async def test_events_name_the_host_never_credentials_path_or_query(pool: Any) -> None:
    for url, host in [
        ("https://user:pw@api.example.com:8443/hook?token=x#f", "api.example.com"),
        ("http://[::1]:9/ops", "[::1]"),
        ("https://hooks.example.com", "hooks.example.com"),
        ("http://user@10.0.0.1/x", "10.0.0.1"),
    ]:
        assert await pool.fetchval("SELECT dispatcher_url_host($1)", url) == host


async def test_producers_cannot_publish_a_reserved_dispatcher_event_type(pool: Any) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="reserved"):
        await support.publish(pool, event_type="dispatcher.subscription.disabled")
    with pytest.raises(asyncpg.CheckViolationError, match="reserved"):
        await pool.execute(
            "INSERT INTO webhook_outbox (event_type, payload) VALUES ('dispatcher.x', '{}')"
        )
    # A look-alike outside the namespace is an ordinary event.
    await support.publish(pool, event_type="dispatcher_x.created")


async def test_why_follows_the_claimers_verdicts(pool: Any) -> None:
    # The texts the claimer leaves on a dead delivery, classified by the trigger's SQL.
    policy = config.RetryPolicy(max_attempts=3, max_4xx_attempts=2, max_age_seconds=60)

    def result(verdict: model.Verdict, status: int | None, error: str) -> model.AttemptResult:
        return model.AttemptResult(verdict, model.Outcome.OTHER, status, error, 0.01)

    cases = [
        (result(model.Verdict.RETRYABLE, 503, "HTTP 503"), 3, 0.0, "attempts"),
        (result(model.Verdict.RETRYABLE, None, "timeout"), 1, 59.99, "age"),
        (result(model.Verdict.PERMANENT, 422, "HTTP 422"), 2, 0.0, "4xx_rule"),
        (result(model.Verdict.BLOCKED, None, "blocked: 10.0.0.1 is private"), 1, 0.0, "blocked"),
        (result(model.Verdict.RETRYABLE, 429, "HTTP 429"), 3, 0.0, "attempts"),
    ]
    for attempt_result, attempt, age, why in cases:
        state, _, error = claimer.decide(
            attempt_result, attempt=attempt, age_seconds=age, policy=policy, rand=lambda: 1.0
        )
        assert state is model.DeliveryState.DEAD, attempt_result
        got = await pool.fetchval(
            "SELECT dispatcher_dead_why($1, $2)", attempt_result.status, error
        )
        assert got == why, (error, got)
    # A lease that kept expiring (the reaper's text).
    assert (
        await pool.fetchval("SELECT dispatcher_dead_why(NULL, 'lease expired (worker lost)')")
        == "attempts"
    )
