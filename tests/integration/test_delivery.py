"""Delivery outcomes end to end on a real Postgres with real receivers: success, retries,
dead-lettering, 410, Retry-After, redirects, and signatures checked by an independent library."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

import standardwebhooks

import dispatcher
from dispatcher import config, ports
from dispatcher.db import repository
from tests import support


async def _states(pool: Any) -> list[str]:
    return [
        r["state"] for r in await pool.fetch("SELECT state FROM webhook_deliveries ORDER BY id")
    ]


async def test_delivers_signed_request_verified_independently(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    await support.subscribe(pool, receiver.url, signature_header="X-AgentX-Signature")
    [event_id] = await support.publish(pool, payload=lambda i: {"n": i, "text": "héllo"})
    await start_dispatcher()
    await support.wait_for(receiver.ok, message="a delivery")
    req = receiver.requests[0]
    assert req.headers["content-type"] == "application/json"
    assert req.headers["webhook-id"] == event_id
    # Responses are stored as sent (no automatic decompression): none is asked for.
    assert req.headers.get("accept-encoding", "identity") == "identity"
    # Standard Webhooks, verified by the public library.
    wh = standardwebhooks.Webhook(support.SECRET)
    payload = wh.verify(
        req.body,
        {k: req.headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")},
    )
    assert payload == {"n": 0, "text": "héllo"}
    # Body HMAC, verified the way a receiver's few lines of hmac would.
    expected = hmac.new(support.SECRET.encode(), req.body, hashlib.sha256).hexdigest()
    assert req.headers["x-agentx-signature"] == "sha256=" + expected
    await support.wait_for(lambda: _states(pool), message="ack")
    await support.wait_for(lambda: _all(pool, "delivered"), message="delivered state")
    attempts = await pool.fetch("SELECT outcome, status_code, applied FROM webhook_attempts")
    assert [(a["outcome"], a["status_code"], a["applied"]) for a in attempts] == [
        ("success", 200, True)
    ]


async def _all(pool: Any, state: str) -> bool:
    states = await _states(pool)
    return bool(states) and all(s == state for s in states)


async def test_retries_then_succeeds_with_same_id_and_bytes(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    receiver.respond = lambda n, _h, _b: (500 if n < 2 else 200, {}, 0.0)
    await support.subscribe(pool, receiver.url)
    await support.publish(pool)
    await start_dispatcher()
    await support.wait_for(lambda: _all(pool, "delivered"), message="delivered after retries")
    assert [r.status for r in receiver.requests] == [500, 500, 200]
    assert len(set(receiver.ids())) == 1
    assert len({r.body for r in receiver.requests}) == 1
    timestamps = [r.headers["webhook-timestamp"] for r in receiver.requests]
    assert all(t.isdigit() for t in timestamps)
    rows = await pool.fetch("SELECT attempt, outcome FROM webhook_attempts ORDER BY id")
    assert [(r["attempt"], r["outcome"]) for r in rows] == [
        (1, "http_5xx"),
        (2, "http_5xx"),
        (3, "success"),
    ]


async def test_exhausted_retries_dead_letter_with_last_error(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    receiver.respond = lambda _n, _h, _b: (503, {}, 0.0)
    await support.subscribe(pool, receiver.url)
    await support.publish(pool)
    await start_dispatcher(
        retry=config.RetryPolicy(base_seconds=0.01, cap_seconds=0.02, max_attempts=3)
    )
    await support.wait_for(lambda: _all(pool, "dead"), message="dead letter")
    assert len(receiver.requests) == 3
    row = await pool.fetchrow(
        "SELECT attempt, last_status, last_error, finished_at FROM webhook_deliveries"
    )
    assert row["attempt"] == 3
    assert row["last_status"] == 503
    assert "HTTP 503" in row["last_error"]
    assert "exhausted" in row["last_error"]
    assert row["finished_at"] is not None


async def test_client_errors_are_retried_a_few_times_then_dead(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    receiver.respond = lambda _n, _h, _b: (400, {}, 0.0)
    await support.subscribe(pool, receiver.url)
    await support.publish(pool)
    await start_dispatcher()  # fast_settings: max_4xx_attempts=2, max_attempts=5
    await support.wait_for(lambda: _all(pool, "dead"), message="dead after 4xx")
    assert len(receiver.requests) == 2


async def test_redirect_is_a_failure_and_never_followed(
    pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    target = await make_receiver()
    redirecting = await make_receiver()
    redirecting.respond = lambda _n, _h, _b: (302, {"Location": target.url}, 0.0)
    await support.subscribe(pool, redirecting.url)
    await support.publish(pool)
    await start_dispatcher()
    await support.wait_for(lambda: _all(pool, "dead"), message="dead after redirects")
    assert target.requests == []
    outcomes = {r["outcome"] for r in await pool.fetch("SELECT outcome FROM webhook_attempts")}
    assert outcomes == {"other"}


async def test_gone_disables_subscription_and_parks_its_work(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    receiver.respond = lambda _n, _h, _b: (410, {}, 0.0)
    sub = await support.subscribe(pool, receiver.url, max_in_flight=1)
    await support.publish(pool, 3)
    await start_dispatcher()
    await support.wait_for(lambda: _all(pool, "parked"), message="all parked")
    row = await pool.fetchrow("SELECT enabled, disabled_reason FROM webhook_subscriptions")
    assert row["enabled"] is False
    assert "410" in row["disabled_reason"]
    assert len(receiver.requests) == 1  # the others were parked without being sent
    # Nothing is lost: enabling resumes the parked deliveries.
    receiver.respond = lambda _n, _h, _b: (200, {}, 0.0)
    await repository.Repository(pool).enable_subscription(sub)
    await support.wait_for(lambda: _all(pool, "delivered"), message="delivered after enable")


async def test_retry_after_is_honoured(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    receiver.respond = lambda n, _h, _b: (
        (429, {"Retry-After": "1"}, 0.0) if n == 0 else (200, {}, 0.0)
    )
    await support.subscribe(pool, receiver.url)
    await support.publish(pool)
    await start_dispatcher()
    await support.wait_for(lambda: _all(pool, "delivered"), timeout=10, message="delivered")
    gap = receiver.requests[1].at - receiver.requests[0].at
    assert gap >= 0.95, f"retried after {gap:.3f}s despite Retry-After: 1"
    outcome = await pool.fetchval("SELECT outcome FROM webhook_attempts ORDER BY id LIMIT 1")
    assert outcome == "http_429"


async def test_retry_after_is_clamped(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    far = datetime(2099, 1, 1, tzinfo=UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    receiver.respond = lambda _n, _h, _b: (503, {"Retry-After": far}, 0.0)
    await support.subscribe(pool, receiver.url)
    await support.publish(pool)
    policy = config.RetryPolicy(
        base_seconds=0.01, cap_seconds=0.02, max_attempts=5, retry_after_max_seconds=30
    )
    await start_dispatcher(retry=policy)
    await support.wait_for(lambda: _all(pool, "retrying"), message="retry scheduled")
    wait = await pool.fetchval(
        "SELECT extract(epoch FROM next_attempt_at - updated_at) FROM webhook_deliveries"
    )
    assert 29 <= float(wait) <= 30.5


async def test_unreachable_url_is_retried_as_connect_error(
    pool: Any, start_dispatcher: Any
) -> None:
    await support.subscribe(pool, f"http://127.0.0.1:{ports.free_port()}/nothing-listens")
    await support.publish(pool)
    await start_dispatcher(
        retry=config.RetryPolicy(base_seconds=0.01, cap_seconds=0.02, max_attempts=2)
    )
    await support.wait_for(lambda: _all(pool, "dead"), message="dead after connect errors")
    outcomes = [r["outcome"] for r in await pool.fetch("SELECT outcome FROM webhook_attempts")]
    assert outcomes == ["connect_error", "connect_error"]


async def test_blocked_destination_is_dead_at_once(pool: Any, start_dispatcher: Any) -> None:
    await support.subscribe(pool, "http://169.254.169.254/latest/meta-data")
    await support.publish(pool)
    await start_dispatcher()
    await support.wait_for(lambda: _all(pool, "dead"), message="blocked → dead")
    rows = await pool.fetch("SELECT outcome, error FROM webhook_attempts")
    assert [r["outcome"] for r in rows] == ["blocked"]
    assert "blocked" in rows[0]["error"]


async def test_ordering_key_holds_under_random_failures(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    import random

    rng = random.Random(7)
    receiver.respond = lambda _n, _h, _b: (500 if rng.random() < 0.3 else 200, {}, 0.0)
    await support.subscribe(pool, receiver.url, max_in_flight=10)
    keys = ["a", "b", "c"]
    async with pool.acquire() as conn:
        for i in range(30):
            await dispatcher.publish(
                conn, "t.x", {"i": i, "key": keys[i % 3]}, ordering_key=keys[i % 3]
            )
    await start_dispatcher(
        retry=config.RetryPolicy(base_seconds=0.005, cap_seconds=0.01, max_attempts=50)
    )
    await support.wait_for(lambda: _all(pool, "delivered"), timeout=30, message="all delivered")
    import json

    for key in keys:
        seen = [json.loads(r.body)["i"] for r in receiver.ok() if json.loads(r.body)["key"] == key]
        assert seen == sorted(seen), f"order broken for key {key}: {seen}"
        # Nothing of a later event was even attempted before the earlier one succeeded.
        attempted = [
            json.loads(r.body)["i"] for r in receiver.requests if json.loads(r.body)["key"] == key
        ]
        assert attempted == sorted(attempted)


async def test_one_dead_subscriber_does_not_delay_the_others(
    pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    slow = await make_receiver()
    slow.release.clear()  # holds every request until released
    fast = await make_receiver()
    await support.subscribe(pool, slow.url, max_in_flight=2)
    await support.subscribe(pool, fast.url)
    await support.publish(pool, 20)
    await start_dispatcher(max_in_flight=8)
    # The claim visits subscriptions from a random start, so the slow one's slots may be
    # taken after some of the fast one's work: wait until it holds both, then the fast
    # subscriber must still be served in full while they stay held.
    await support.wait_for(lambda: slow.max_concurrent == 2, message="slow subscriber held")
    await support.wait_for(lambda: len(fast.ok()) == 20, message="fast subscriber served")
    assert slow.max_concurrent == 2
    assert slow.concurrent == 2  # still held while the fast one was served
    slow.release.set()


async def test_subscription_retry_policy_overrides_the_configured_one(
    pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    """Two failing subscriptions: the one with max_attempts=2 is dead after 2 tries, the
    other follows the configured policy (5 tries in fast_settings)."""
    strict = await make_receiver()
    default = await make_receiver()
    for r in (strict, default):
        r.respond = lambda _n, _h, _b: (500, {}, 0.0)
    await support.subscribe(pool, strict.url, retry_policy={"max_attempts": 2})
    await support.subscribe(pool, default.url)
    await support.publish(pool)
    await start_dispatcher()
    await support.wait_for(lambda: _all(pool, "dead"), message="both dead")
    assert len(strict.requests) == 2
    assert len(default.requests) == 5
