"""A subscription's owner (sql/015_slot_owner.sql): the one claimer on a subscription holds up to
its cap again in claimed rows and keeps the cap on the wire itself, so a finished request is
followed at once; any other claimer waits until ownership is given up, then claims by the old
rule (cap minus rows in flight), and the cap on requests holds throughout."""

from __future__ import annotations

import uuid
from typing import Any

import dispatcher
from dispatcher.db import repository
from tests import support

SECRET = "whsec_" + "O" * 32


async def _subscription(pool: Any, events: int, *, max_in_flight: int = 2) -> uuid.UUID:
    repo = repository.Repository(pool)
    sub = await repo.create_subscription(
        url="http://127.0.0.1:1/", event_types=["*"], secret=SECRET, max_in_flight=max_in_flight
    )
    async with pool.acquire() as conn:
        for i in range(events):
            await dispatcher.publish(conn, "e", {"i": i})
    await repo.route(events)
    return uuid.UUID(str(sub["id"]))


async def _owner(pool: Any, sub: uuid.UUID) -> str | None:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "SELECT claim_owner FROM webhook_subscriptions WHERE id = $1 AND claim_owner_until > now()",
        sub,
    )


async def test_the_owner_holds_its_cap_again_and_the_others_wait_for_it(pool: Any) -> None:
    sub = await _subscription(pool, 10)
    repo = repository.Repository(pool)
    held_by_a = await repo.claim("a", 10, 30, ahead=5)
    # Cap 2 and 2 more held (at most the cap again), each to go out at most 2 at a time.
    assert len(held_by_a) == 4
    assert {(j.wire_cap, j.capped) for j in held_by_a} == {(2, True)}
    assert await _owner(pool, sub) == "a"
    # Only the owner knows how many of its rows are on the wire: b takes nothing.
    assert await repo.claim("b", 10, 30, ahead=5) == []
    # b now waits; a's next claim gives ownership up and leaves the slot it freed.
    _, refill = await repo.complete_and_claim([support.ack(held_by_a[0])], "a", 10, 30, 5)
    assert refill == []
    assert await _owner(pool, sub) is None
    # The old rule from here: a's 3 rows in flight are above the cap of 2, so b still waits,
    assert await repo.claim("b", 10, 30, ahead=5) == []
    # and gets the one slot left once a is down to 1 (b is not the owner: a still has rows).
    await repo.ack([support.ack(j) for j in held_by_a[1:3]], "a")
    taken_by_b = await repo.claim("b", 10, 30, ahead=5)
    assert len(taken_by_b) == 1
    assert await _owner(pool, sub) is None


async def test_ownership_is_taken_only_while_nobody_has_rows_in_flight(pool: Any) -> None:
    sub = await _subscription(pool, 10, max_in_flight=3)
    repo = repository.Repository(pool)
    assert len(await repo.claim("b", 1, 30)) == 1  # an older caller: never owns
    assert await _owner(pool, sub) is None
    taken_by_a = await repo.claim("a", 10, 30, ahead=5)
    assert len(taken_by_a) == 2  # the cap minus b's row, not the owner's room
    assert {j.wire_cap for j in taken_by_a} == {None}  # kept to the cap by the claim itself
    assert await _owner(pool, sub) is None


async def test_a_lapsed_owner_leaves_the_old_rule(pool: Any) -> None:
    sub = await _subscription(pool, 10)
    repo = repository.Repository(pool)
    held_by_a = await repo.claim("a", 10, 30, ahead=5)
    assert len(held_by_a) == 4
    # a stops claiming (stalled, or gone): its ownership lapses, its rows still count.
    await pool.execute(
        "UPDATE webhook_subscriptions SET claim_owner_until = now() - interval '1 second'"
    )
    assert await repo.claim("b", 10, 30, ahead=5) == []
    await repo.ack([support.ack(j) for j in held_by_a[:3]], "a")
    assert len(await repo.claim("b", 10, 30, ahead=5)) == 1
    assert await _owner(pool, sub) is None


async def test_the_owner_keeps_the_cap_on_the_wire_while_it_holds_more(
    start_dispatcher: Any, pool: Any, receiver: support.Receiver
) -> None:
    repo = repository.Repository(pool)
    sub = await repo.create_subscription(
        url=receiver.url, event_types=["*"], secret=SECRET, max_in_flight=3
    )
    receiver.release.clear()  # every request waits until the test lets them go
    async with pool.acquire() as conn, conn.transaction():
        for i in range(12):
            await dispatcher.publish(conn, "owned.event", {"i": i})
    running = await start_dispatcher(max_in_flight=10, prefetch=10)
    try:

        async def leased(n: int) -> bool:
            count = await pool.fetchval(
                "SELECT count(*) FROM webhook_deliveries WHERE state = 'in_flight'"
            )
            return int(count) == n

        # Three on the wire, three more held for the moment one of them ends.
        await support.wait_for(lambda: leased(6), message="6 deliveries leased")
        await support.wait_for(lambda: receiver.concurrent == 3, message="3 on the wire")
        assert running.dispatcher.claimer.in_flight() == 6
        assert await _owner(pool, uuid.UUID(str(sub["id"]))) is not None
        receiver.release.set()
        await support.wait_for(lambda: len(receiver.ok()) == 12, message="all 12 delivered")
    finally:
        await running.stop()
    assert receiver.max_concurrent == 3
    assert len(receiver.ids()) == len(set(receiver.ids())) == 12  # each sent once
    # Stopping gives ownership up at once, for the replicas that stay.
    assert await _owner(pool, uuid.UUID(str(sub["id"]))) is None


async def test_a_410_hands_the_held_deliveries_back_unsent(
    start_dispatcher: Any, pool: Any, receiver: support.Receiver
) -> None:
    receiver.respond = lambda _n, _h, _b: (410, {}, 0.0)
    repo = repository.Repository(pool)
    await repo.create_subscription(
        url=receiver.url, event_types=["*"], secret=SECRET, max_in_flight=2
    )
    receiver.release.clear()
    async with pool.acquire() as conn, conn.transaction():
        for i in range(6):
            await dispatcher.publish(conn, "gone.event", {"i": i})
    running = await start_dispatcher(max_in_flight=10, prefetch=10)
    try:
        await support.wait_for(lambda: running.dispatcher.claimer.in_flight() == 4)
        receiver.release.set()
        await support.wait_for(
            lambda: pool.fetchval(
                "SELECT count(*) = 6 FROM webhook_deliveries WHERE state = 'parked'"
            ),
            message="the unsent ones parked with the disabled subscription",
        )
    finally:
        await running.stop()
    # The two on the wire when the endpoint said 410; none of the two held behind them.
    assert len(receiver.requests) == 2
