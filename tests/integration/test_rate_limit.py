"""Per-subscription rate limit across replicas: with two dispatchers claiming from one
database, the receiver sees no more than the configured requests per second.

The bucket holds one second's worth of tokens (here 10) and starts full, so n requests
need ``t_last - t_publish >= (n - burst) / rate``, where t_publish (taken before the events
exist) precedes every claim. Arrival times lag claim times by a scheduling delay that can
bunch requests on a loaded machine, so the rate allows 10% and the one-second windows two
requests of slack."""

from __future__ import annotations

import time
from typing import Any

import dispatcher
from tests import support
from tests.integration.api_support import TOKEN, Client, api

__all__ = ["TOKEN", "api"]  # the fixture, imported for pytest

RATE = 10.0
BURST = 10
EVENTS = 30
TOLERANCE = 0.10


async def test_rate_limit_holds_across_two_replicas(
    api: Client, start_dispatcher: Any, pool: Any, receiver: support.Receiver
) -> None:
    await start_dispatcher(admin_token=TOKEN)  # the second replica (`api` runs the first)
    created = await api.post(
        "/subscriptions",
        {
            "url": receiver.url,
            "event_types": ["tick"],
            "max_in_flight": 50,
            "rate_limit_per_second": RATE,
        },
    )
    assert created.status == 201
    published_at = time.time()
    async with pool.acquire() as conn:
        for i in range(EVENTS):
            await dispatcher.publish(conn, "tick", {"i": i})

    await support.wait_for(
        lambda: len(receiver.ok()) == EVENTS, timeout=20, message="every event delivered"
    )
    times = sorted(r.at for r in receiver.ok())
    span = times[-1] - published_at
    measured = (EVENTS - BURST) / span
    print(f"rate limit {RATE}/s: {EVENTS} requests in {span:.2f}s, steady {measured:.2f}/s")
    assert measured <= RATE * (1 + TOLERANCE), f"{measured:.2f}/s exceeds {RATE}/s"
    # Any one-second window holds at most a full bucket plus one second of refill.
    for i, start in enumerate(times):
        in_window = sum(1 for t in times[i:] if t < start + 1.0)
        assert in_window <= BURST + RATE + 2, f"{in_window} requests within one second"
    # The limiter throttles; it does not stall: the rate is reached, not just bounded.
    assert measured >= RATE * 0.6, f"only {measured:.2f}/s"
    workers = await pool.fetchval("SELECT count(DISTINCT worker) FROM webhook_attempts")
    assert workers == 2, "both replicas should have delivered"
