"""Deliveries claimed ahead of free request slots (``DISPATCHER_PREFETCH``): never more requests
on the wire than ``max_in_flight``, a held delivery starts the moment a request ends, and a
shutdown or a hold past half the lease margin hands the held ones back unsent.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import dispatcher
from dispatcher import logs
from dispatcher.db import repository
from tests import support

SECRET = "whsec_" + "B" * 32


async def _held(pool: Any, n: int) -> bool:
    """Exactly ``n`` deliveries leased (on the wire or held)."""
    rows = await pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = 'in_flight'")
    return int(rows) == n


async def _setup(pool: Any, receiver: support.Receiver, events: int) -> None:
    repo = repository.Repository(pool)
    await repo.create_subscription(
        url=receiver.url, event_types=["*"], secret=SECRET, max_in_flight=20
    )
    receiver.release.clear()  # every request waits until the test lets them go
    async with pool.acquire() as conn, conn.transaction():
        for i in range(events):
            await dispatcher.publish(conn, "held.event", {"i": i})


async def test_held_deliveries_wait_off_the_wire_and_start_as_requests_end(
    start_dispatcher: Any, pool: Any, receiver: support.Receiver
) -> None:
    await _setup(pool, receiver, 8)
    running = await start_dispatcher(max_in_flight=2, prefetch=2)
    try:
        # Two on the wire, two more claimed and held: four leases, two requests.
        await support.wait_for(lambda: _held(pool, 4), message="4 deliveries leased")
        await support.wait_for(lambda: receiver.concurrent == 2, message="2 on the wire")
        assert running.dispatcher.claimer.in_flight() == 4
        receiver.release.set()
        await support.wait_for(lambda: len(receiver.ok()) == 8, message="all 8 delivered")
    finally:
        await running.stop()
    assert receiver.max_concurrent == 2
    assert len(receiver.ids()) == len(set(receiver.ids())) == 8  # each sent once


async def test_a_shutdown_hands_the_held_deliveries_back_unsent(
    start_dispatcher: Any, pool: Any, receiver: support.Receiver
) -> None:
    await _setup(pool, receiver, 6)
    running = await start_dispatcher(max_in_flight=2, prefetch=2, shutdown_grace_seconds=0.2)
    await support.wait_for(lambda: _held(pool, 4), message="4 deliveries leased")
    await support.wait_for(lambda: receiver.concurrent == 2, message="2 on the wire")
    await running.stop()
    receiver.release.set()
    assert len(receiver.requests) == 2  # the held two never went out
    assert await _held(pool, 0)
    # Handed back without counting an attempt (as the two cut off by the shutdown are).
    assert await pool.fetchval("SELECT max(attempt) FROM webhook_deliveries") == 0


async def test_a_delivery_held_past_half_the_lease_margin_is_handed_back_unsent(
    start_dispatcher: Any,
    pool: Any,
    receiver: support.Receiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await _setup(pool, receiver, 3)
    # Lease margin 0.4 s: a delivery may be held 0.2 s waiting for the wire.
    running = await start_dispatcher(max_in_flight=1, prefetch=1, lease_margin_seconds=0.4)
    try:
        await support.wait_for(lambda: _held(pool, 2), message="1 on the wire, 1 held")
        claimer = running.dispatcher.claimer
        # The condition the hand-back acts on: the held delivery's age (from the claimer's
        # own record of when it was held) past the limit, half the lease margin.
        await support.wait_for(
            lambda: bool(claimer._ready) and time.monotonic() - claimer._ready[0][1] > 0.2,
            message="the held delivery is past the hold limit",
        )
        receiver.release.set()
        await support.wait_for(lambda: len(set(receiver.ids())) == 3, message="all delivered")
    finally:
        await running.stop()
    logs.flush()
    captured = capsys.readouterr()
    assert "held_delivery_released" in captured.out + captured.err
    # Given back unsent, then claimed again: every event went out once, as one attempt.
    assert len(receiver.ids()) == 3
    attempts = await pool.fetch("SELECT attempt FROM webhook_deliveries")
    assert [r["attempt"] for r in attempts] == [1, 1, 1]
