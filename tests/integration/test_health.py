"""Endpoint health: the circuit breaker pauses, probes and resumes; a subscription failing for
the whole window is disabled; every change lands in the audit table and in metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from dispatcher import config
from dispatcher.db import health as db_health
from dispatcher.db import repository
from tests import support

SECRET = "whsec_" + "H" * 32

FAST_HEALTH = config.EndpointHealthPolicy(
    disable_after_seconds=0,
    breaker_failure_ratio=0.5,
    breaker_min_attempts=4,
    breaker_window_seconds=10,
    pause_seconds=0.4,
    max_pause_seconds=1.0,
    interval_seconds=0.05,
)
MANY_RETRIES = config.RetryPolicy(
    base_seconds=0.01, cap_seconds=0.05, max_attempts=1000, max_4xx_attempts=2
)


async def _events(pool: Any, sid: str) -> list[dict[str, Any]]:
    return list(reversed(await db_health.events(pool, sid)))


def _metric(running: Any, name: str, **labels: str) -> float:
    value = running.dispatcher.registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def test_breaker_pauses_a_sick_endpoint_probes_it_and_resumes_on_recovery(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    healthy = {"now": False}
    receiver.respond = lambda _n, _h, _b: (200 if healthy["now"] else 503, {}, 0.0)
    sid = await support.subscribe(pool, receiver.url)
    await support.publish(pool, 20)
    running = await start_dispatcher(endpoint_health=FAST_HEALTH, retry=MANY_RETRIES)

    async def paused() -> bool:
        return any(e["kind"] == "paused" for e in await _events(pool, sid))

    await support.wait_for(paused, timeout=10, message="the breaker to trip")
    status = await db_health.status(pool, sid)
    assert status is not None
    assert status["paused"]
    assert status["failing_since"] is not None
    assert "circuit breaker" in (status["paused_reason"] or "")
    # While paused, only probes reach the endpoint: one request per probe, never two at once.
    at_pause = len(receiver.requests)
    await support.wait_for(
        lambda: _count_kind(pool, sid, "paused", 3), timeout=10, message="two failed probes"
    )
    probes = len(receiver.requests) - at_pause
    assert 1 <= probes <= 3, probes
    assert receiver.max_concurrent <= 2

    healthy["now"] = True
    await support.wait_for(
        lambda: _delivered(pool, 20), timeout=15, message="everything delivered after recovery"
    )
    kinds = [e["kind"] for e in await _events(pool, sid)]
    assert kinds[-1] == "resumed", kinds
    resumed = [e for e in await _events(pool, sid) if e["kind"] == "resumed"]
    assert resumed[-1]["reason"] == "probe delivered"
    # Recovery resets both the breaker and the failing window.
    await support.wait_for(
        lambda: _failing_cleared(pool, sid), timeout=5, message="failing_since reset"
    )
    status = await db_health.status(pool, sid)
    assert status is not None
    assert not status["paused"]
    assert status["pause_count"] == 0
    assert _metric(running, "dispatcher_subscription_health_events_total", event="paused") >= 1
    assert _metric(running, "dispatcher_subscription_health_events_total", event="resumed") == 1
    assert _metric(running, "dispatcher_subscription_paused", subscription=sid) == 0


async def _count_kind(pool: Any, sid: str, kind: str, n: int) -> bool:
    return sum(1 for e in await _events(pool, sid) if e["kind"] == kind) >= n


async def _delivered(pool: Any, n: int) -> bool:
    got = await pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")
    return int(got) == n


async def _failing_cleared(pool: Any, sid: str) -> bool:
    status = await db_health.status(pool, sid)
    return status is not None and status["failing_since"] is None


async def test_a_paused_subscription_is_not_claimed_until_its_pause_ends(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    sid = await support.subscribe(pool, receiver.url)
    await pool.execute(
        "UPDATE webhook_subscriptions SET paused_until = now() + interval '1 hour', "
        "probe_at = now() + interval '1 hour', pause_count = 1, paused_reason = 'test' "
        "WHERE id = $1::uuid",
        sid,
    )
    await support.publish(pool, 3)
    await start_dispatcher(endpoint_health=FAST_HEALTH)
    await support.wait_for(
        lambda: _count_state(pool, "pending", 3), timeout=5, message="routed and pending"
    )
    # Several claim cycles pass without touching it (poll interval 0.05 s).
    deadline = time.monotonic() + 0.5
    await support.wait_for(lambda: time.monotonic() > deadline, timeout=2, message="claim cycles")
    assert receiver.requests == []
    await pool.execute("UPDATE webhook_subscriptions SET probe_at = now() WHERE id = $1::uuid", sid)
    await support.wait_for(lambda: _delivered(pool, 3), timeout=10, message="probe, then the rest")
    # The manual pause above is audited too (a trigger sees every change).
    assert [e["kind"] for e in await _events(pool, sid)] == ["paused", "resumed"]


async def _count_state(pool: Any, state: str, n: int) -> bool:
    got = await pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = $1", state)
    return int(got) == n


async def test_failing_for_the_whole_window_disables_and_enabling_starts_clean(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    healthy = {"now": False}
    receiver.respond = lambda _n, _h, _b: (200 if healthy["now"] else 500, {}, 0.0)
    sid = await support.subscribe(pool, receiver.url)
    await support.publish(pool, 5)
    policy = config.EndpointHealthPolicy(
        disable_after_seconds=0.6, breaker_failure_ratio=0, interval_seconds=0.05
    )
    running = await start_dispatcher(endpoint_health=policy, retry=MANY_RETRIES)
    await support.wait_for(
        lambda: _enabled(pool, sid, False), timeout=10, message="auto-disable after the window"
    )
    # Queued work is parked; what was on the wire at that moment waits as `retrying` (the
    # claim skips disabled subscriptions) - either way it is kept, and enabling resumes it.
    await support.wait_for(lambda: _held(pool, 5), timeout=5, message="work held")
    events = await _events(pool, sid)
    assert [e["kind"] for e in events] == ["disabled"]
    assert events[0]["reason"].startswith("failing continuously since")
    assert events[0]["source"] == "dispatcher"
    assert _metric(running, "dispatcher_subscriptions_disabled_total", reason="failing") == 1

    healthy["now"] = True
    await running.dispatcher.repo.enable_subscription(sid)  # what the admin API calls
    status = await db_health.status(pool, sid)
    assert status is not None
    assert status["failing_since"] is None
    await support.wait_for(lambda: _delivered(pool, 5), timeout=10, message="delivered")
    assert [e["kind"] for e in await _events(pool, sid)] == ["disabled", "enabled"]


async def _held(pool: Any, n: int) -> bool:
    got = await pool.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE state IN ('parked', 'retrying')"
    )
    return int(got) == n


async def _enabled(pool: Any, sid: str, want: bool) -> bool:
    got = await pool.fetchval("SELECT enabled FROM webhook_subscriptions WHERE id = $1::uuid", sid)
    return bool(got) is want


async def test_410_disable_is_audited_with_its_reason(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    receiver.respond = lambda _n, _h, _b: (410, {}, 0.0)
    sid = await support.subscribe(pool, receiver.url)
    await support.publish(pool, 1)
    await start_dispatcher(endpoint_health=FAST_HEALTH)
    await support.wait_for(lambda: _enabled(pool, sid, False), timeout=10, message="disabled")
    events = await _events(pool, sid)
    assert [(e["kind"], e["reason"]) for e in events] == [
        ("disabled", "endpoint answered 410 Gone")
    ]


async def test_4xx_answers_count_for_the_window_but_do_not_trip_the_breaker(
    pool: Any, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    receiver.respond = lambda _n, _h, _b: (400, {}, 0.0)
    sid = await support.subscribe(pool, receiver.url)
    await support.publish(pool, 10)
    await start_dispatcher(endpoint_health=FAST_HEALTH)
    await support.wait_for(lambda: _count_state(pool, "dead", 10), timeout=10, message="dead")
    await support.wait_for(
        lambda: _failing_started(pool, sid), timeout=5, message="failing_since set"
    )
    assert [e["kind"] for e in await _events(pool, sid)] == []


async def _failing_started(pool: Any, sid: str) -> bool:
    status = await db_health.status(pool, sid)
    return status is not None and status["failing_since"] is not None


@pytest.mark.parametrize("record", [db_health.record_successes, db_health.record_failures])
async def test_recording_outcomes_cannot_deadlock_with_an_ack(pool: Any, record: Any) -> None:
    """An ack locks its subscriptions in id order (its counting trigger, sql/007) while the
    health monitor records outcomes for several subscriptions at once. Recorded in another
    order, the two deadlocked: one of them failed after deadlock_timeout (seen in the bench's
    idle scenario as ack_write_failed, a one-second stall)."""
    repo = repository.Repository(pool)
    created = [
        await repo.create_subscription(
            url=f"http://127.0.0.1:1/{i}", event_types=["*"], secret=SECRET
        )
        for i in range(2)
    ]
    ids = sorted(uuid.UUID(str(sub["id"])) for sub in created)
    low, high = ids
    async with pool.acquire() as ack:
        async with ack.transaction():
            # The ack's trigger: the lower id first...
            await ack.execute(
                "SELECT 1 FROM webhook_subscriptions WHERE id = $1 FOR NO KEY UPDATE", low
            )
            recording = asyncio.create_task(record(pool, [high, low], [1.0, 1.0]))
            await support.wait_for(
                lambda: pool.fetchval(
                    "SELECT count(*) > 0 FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND query LIKE '%webhook_subscriptions%'"
                ),
                message="the recording waits for the ack",
            )
            # ... then the higher one, which the recording must not be holding.
            await asyncio.wait_for(
                ack.execute(
                    "SELECT 1 FROM webhook_subscriptions WHERE id = $1 FOR NO KEY UPDATE", high
                ),
                5,
            )
        await asyncio.wait_for(recording, 5)
