"""Idle subscriptions must cost nothing: active subscriptions (cap 5) drain the same events
alone and beside many idle ones (other event types, no work), end to end from unrouted
outbox rows; and a 200-row claim is timed directly on the same routed backlog, with and
without the idle ones.

The claim is called inside a transaction that is rolled back, so every call sees the same
backlog. Returns the report section.
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

from dispatcher.bench import core, measure, options

CLAIM_ROWS = 200
CLAIM_CALLS = 20

_IDLE_SUBSCRIPTIONS = """
-- Bench only: subscriptions to event types nobody produces.
INSERT INTO webhook_subscriptions (url, event_types, secret, signature_header, max_in_flight)
SELECT $1 || g, ARRAY['idle.' || g || '.*'], $2, $3, 5
FROM generate_series(1, $4::integer) g
"""
_UNROUTED = """
-- Spread evenly: event g goes to active subscription g mod $3 alone (its own event type).
INSERT INTO webhook_outbox (event_type, payload)
SELECT 'active.' || (g % $3::integer) || '.event', jsonb_build_object('i', g, 'pad', $1::text)
FROM generate_series(1, $2::integer) g
"""


async def _claim_ms(b: core.Bench) -> float:
    """Median time of a ``CLAIM_ROWS``-row claim over the seeded backlog, rolled back."""
    times = []
    for _ in range(CLAIM_CALLS):
        tx = b.db.conn.transaction()
        await tx.start()
        try:
            started = time.perf_counter()
            await b.db.conn.fetch(
                "SELECT * FROM dispatcher_claim('bench-claim', $1, 60)", CLAIM_ROWS
            )
            times.append((time.perf_counter() - started) * 1000)
        finally:
            await tx.rollback()
    return round(statistics.median(times), 2)


async def _one(b: core.Bench, label: str, idle: int) -> dict[str, Any]:
    o = b.o
    tag = f"idle_{label}"
    await b.db.reset()
    if idle:
        await b.db.conn.execute(
            _IDLE_SUBSCRIPTIONS,
            b.receiver.url("ok", "idle_never", 0) + "/",
            options.SECRET,
            options.SIGNATURE_HEADER,
            idle,
        )
    subs: list[uuid.UUID] = [
        await b.db.subscribe(
            b.receiver.url("ok", tag, i), event_types=[f"active.{i}.*"], max_in_flight=5
        )
        for i in range(o.idle_active)
    ]
    await b.db.seed(subs, o.idle_events, o.payload_bytes)
    await b.db.conn.execute("ANALYZE webhook_subscriptions")
    claim_ms = await _claim_ms(b)
    await b.db.conn.execute("TRUNCATE webhook_attempts, webhook_deliveries, webhook_outbox")
    await b.db.conn.execute(
        _UNROUTED, measure.payload_pad(o.payload_bytes), o.idle_events, o.idle_active
    )
    fleet = b.fleet()
    fleet.start(1, tag)
    try:
        await fleet.wait_ready()
        drain = await measure.watch(
            b.receiver,
            tag,
            o.idle_events,
            timeout=o.scenario_timeout_seconds,
            say=b.say,
            label=f"{o.idle_active} active beside {idle:,} idle",
        )
    finally:
        await b.retire(fleet)
    return {"idle_subscriptions": idle, "claim_ms": claim_ms, **drain.as_dict()}


async def idle(b: core.Bench) -> dict[str, Any]:
    o = b.o
    alone = await _one(b, "alone", 0)
    beside = await _one(b, "beside", o.idle_idle)
    return {
        "active_subscriptions": o.idle_active,
        "max_in_flight": 5,
        "claim_rows": CLAIM_ROWS,
        "alone": alone,
        "beside": beside,
        "throughput_ratio": measure.ratio(beside["rate_per_second"], alone["rate_per_second"]),
        "claim_cost_ratio": measure.ratio(beside["claim_ms"], alone["claim_ms"]),
    }
