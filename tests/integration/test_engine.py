"""The delivery engine's mechanisms, each against a real Postgres: routing through the pattern
index (equal to the rule it replaced, on random inputs), the in-flight counter (exact after
claims, acks, lease expiry, releases, disables and deletes), complete-and-claim (one round
trip that sees the slots its acks freed), the `capped` hint, trace context on the job, and a
capped subscription drained with no timer to help (the poll set to a minute).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import aiohttp
import asyncpg

import dispatcher
from dispatcher import app, model
from dispatcher.db import repository
from tests import conftest, support

SECRET = "whsec_" + "A" * 32

# The routing rule before the pattern index, verbatim: the oracle for the property test.
_OLD_RULE = """
SELECT t.i, p.j
FROM unnest($1::text[]) WITH ORDINALITY AS t(event_type, i),
     unnest($2::text[]) WITH ORDINALITY AS p(pattern, j)
WHERE p.pattern = t.event_type
   OR p.pattern = '*'
   OR (right(p.pattern, 2) = '.*' AND starts_with(t.event_type, left(p.pattern, -1)))
"""
_NEW_RULE = """
SELECT t.i, p.j
FROM unnest($1::text[]) WITH ORDINALITY AS t(event_type, i),
     unnest($2::text[]) WITH ORDINALITY AS p(pattern, j)
WHERE p.pattern = ANY (dispatcher_type_patterns(t.event_type))
"""


def _word(rng: random.Random, alphabet: str, max_len: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len)))


async def test_pattern_expansion_matches_exactly_what_the_old_rule_matched(pool: Any) -> None:
    rng = random.Random(7)
    # A tiny alphabet so dots, stars and shared prefixes collide often.
    types = [_word(rng, "ab.", 7) for _ in range(300)] + ["a.*", "*", ".", "a..b", "a."]
    patterns = [_word(rng, "ab.*", 6) for _ in range(120)] + ["*", "a.*", ".*", "a.b.*", "*.*"]
    old = {(r[0], r[1]) for r in await pool.fetch(_OLD_RULE, types, patterns)}
    new = {(r[0], r[1]) for r in await pool.fetch(_NEW_RULE, types, patterns)}
    assert old == new
    assert len(old) > 500  # the sample exercises the rule, not just misses


async def test_routing_through_the_index_equals_the_old_rule(pool: Any) -> None:
    rng = random.Random(11)
    repo = repository.Repository(pool)
    subs: dict[str, list[str]] = {}
    for n in range(40):
        pats = list({_word(rng, "ab.*", 5) for _ in range(rng.randint(1, 3))})
        created = await repo.create_subscription(
            url=f"http://127.0.0.1:1/{n}", event_types=pats, secret=SECRET
        )
        subs[str(created["id"])] = pats
    # Patterns follow later edits too (the index is kept by a trigger).
    first = next(iter(subs))
    subs[first] = ["*"]
    await pool.execute(
        "UPDATE webhook_subscriptions SET event_types = $2 WHERE id = $1",
        uuid.UUID(first),
        subs[first],
    )
    types = [_word(rng, "ab.", 6) for _ in range(150)]
    async with pool.acquire() as conn:
        for t in types:
            await dispatcher.publish(conn, t, {"t": t})
    while (await repo.route(64)).events:
        pass
    rows = await pool.fetch(
        "SELECT o.event_type, d.subscription_id::text AS sub FROM webhook_deliveries d "
        "JOIN webhook_outbox o ON o.id = d.outbox_id"
    )
    got: dict[str, set[str]] = {}
    for r in rows:
        got.setdefault(r["event_type"], set()).add(r["sub"])
    for t in set(types):
        expected = set()
        for sub, pats in subs.items():
            matched = await pool.fetchval("SELECT count(*) FROM (" + _OLD_RULE + ") x", [t], pats)
            if matched:
                expected.add(sub)
        assert got.get(t, set()) == expected, t
    # One delivery per (event, subscription), even when several patterns of it match.
    per_event = await pool.fetchval(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM webhook_deliveries "
        "GROUP BY outbox_id, subscription_id) x"
    )
    assert per_event == 1


async def _counter_drift(pool: Any) -> list[Any]:
    """Subscriptions whose counter differs from the rows it counts."""
    return list(
        await pool.fetch(
            """
            SELECT s.id, s.in_flight_count,
                   (SELECT count(*) FROM webhook_deliveries d
                    WHERE d.subscription_id = s.id AND d.state = 'in_flight') AS actual
            FROM webhook_subscriptions s
            WHERE s.in_flight_count <> (SELECT count(*) FROM webhook_deliveries d
                                        WHERE d.subscription_id = s.id
                                          AND d.state = 'in_flight')
            """
        )
    )


def _ack(job: Any, state: str = "delivered", **kw: Any) -> model.Ack:
    return model.Ack(
        delivery_id=job.delivery_id,
        lease_token=job.lease_token,
        attempt=job.attempt,
        state=state,
        delay_seconds=kw.get("delay"),
        status=200 if state == "delivered" else 500,
        error=None if state == "delivered" else "HTTP 500",
        started_at=0.0,
        duration_ms=1.0,
        outcome="success" if state == "delivered" else "http_5xx",
        response=None,
    )


async def test_in_flight_counter_stays_exact_through_every_transition(pool: Any) -> None:
    rng = random.Random(3)
    repo = repository.Repository(pool)
    subs = [
        str(
            (
                await repo.create_subscription(
                    url=f"http://127.0.0.1:1/{n}",
                    event_types=["e.*"],
                    secret=SECRET,
                    max_in_flight=rng.randint(1, 4),
                )
            )["id"]
        )
        for n in range(4)
    ]
    async with pool.acquire() as conn:
        for i in range(120):
            await dispatcher.publish(conn, f"e.{i % 3}", {"i": i})
    while (await repo.route(50)).events:
        pass
    held: list[Any] = []
    for step in range(60):
        op = rng.choice(["claim", "ack", "retry", "expire", "release", "toggle", "combined"])
        if op == "claim":
            held += await repo.claim("w", rng.randint(1, 6), 30)
        elif op == "ack" and held:
            batch = [held.pop(rng.randrange(len(held))) for _ in range(min(len(held), 3))]
            # Some acks are stale: their lease was already taken away by "expire".
            await repo.ack([_ack(j) for j in batch], "w")
        elif op == "retry" and held:
            job = held.pop()
            await repo.ack([_ack(job, "retrying", delay=0.0)], "w")
        elif op == "expire":
            await pool.execute(
                "UPDATE webhook_deliveries SET leased_until = now() - interval '1 s' "
                "WHERE state = 'in_flight' AND id % 3 = $1",
                step % 3,
            )
            await repo.reclaim_expired(max_attempts=50)
        elif op == "release" and held:
            job = held.pop()
            await repo.release([(job.delivery_id, job.lease_token)])
        elif op == "toggle":
            sub = rng.choice(subs)
            await repo.disable_subscription(sub, "test")
            await repo.enable_subscription(sub)
        elif op == "combined" and held:
            batch = [held.pop() for _ in range(min(len(held), 2))]
            _, jobs = await repo.complete_and_claim([_ack(j) for j in batch], "w", 4, 30)
            held += jobs
        assert await _counter_drift(pool) == [], (step, op)
        # The cap holds: the counter never passes max_in_flight.
        over = await pool.fetchval(
            "SELECT count(*) FROM webhook_subscriptions WHERE in_flight_count > max_in_flight"
        )
        assert over == 0, (step, op)
    # A delete of in-flight rows (a subscription's deletion cascades) and a rolled-back
    # claim (a crash mid-transaction) leave it exact too.
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.fetch("SELECT * FROM dispatcher_claim('w', 50, 30)")
        await tx.rollback()
    assert await _counter_drift(pool) == []
    await pool.execute("DELETE FROM webhook_deliveries WHERE state = 'in_flight' AND id % 2 = 0")
    assert await _counter_drift(pool) == []


async def test_complete_and_claim_refills_the_slot_its_ack_frees(pool: Any) -> None:
    repo = repository.Repository(pool)
    await repo.create_subscription(
        url="http://127.0.0.1:1/", event_types=["*"], secret=SECRET, max_in_flight=1
    )
    async with pool.acquire() as conn:
        for i in range(3):
            await dispatcher.publish(conn, "e", {"i": i})
    await repo.route(10)
    first = await repo.claim("w", 10, 30)
    assert len(first) == 1
    assert first[0].capped
    assert await repo.claim("w", 10, 30) == []  # the cap holds
    applied, second = await repo.complete_and_claim([_ack(first[0])], "w", 10, 30)
    assert applied == {first[0].delivery_id}
    assert len(second) == 1
    assert second[0].delivery_id != first[0].delivery_id
    # A stale result (token no longer matches) is fenced in the combined call too.
    stale = _ack(first[0])
    applied, third = await repo.complete_and_claim([stale], "w", 10, 30)
    assert applied == set()
    assert third == []
    states = await pool.fetch("SELECT state, count(*) FROM webhook_deliveries GROUP BY 1")
    assert {r[0]: r[1] for r in states} == {"delivered": 1, "in_flight": 1, "pending": 1}
    logged = await pool.fetch("SELECT applied FROM webhook_attempts ORDER BY id")
    assert [r[0] for r in logged] == [True, False]


async def test_capped_only_when_the_cap_cut_the_claim(pool: Any) -> None:
    repo = repository.Repository(pool)
    small = await repo.create_subscription(
        url="http://127.0.0.1:1/s", event_types=["s"], secret=SECRET, max_in_flight=2
    )
    roomy = await repo.create_subscription(
        url="http://127.0.0.1:1/r", event_types=["r"], secret=SECRET, max_in_flight=10
    )
    async with pool.acquire() as conn:
        for i in range(5):
            await dispatcher.publish(conn, "s", {"i": i})
        for i in range(3):
            await dispatcher.publish(conn, "r", {"i": i})
    await repo.route(20)
    jobs = await repo.claim("w", 50, 30)
    by_sub: dict[str, list[bool]] = {}
    for j in jobs:
        by_sub.setdefault(j.subscription_id, []).append(j.capped)
    assert by_sub[str(small["id"])] == [True, True]
    assert by_sub[str(roomy["id"])] == [False, False, False]


async def test_trace_context_travels_from_the_outbox_row_to_the_job(pool: Any) -> None:
    repo = repository.Repository(pool)
    await repo.create_subscription(url="http://127.0.0.1:1/", event_types=["*"], secret=SECRET)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await pool.execute(
        "INSERT INTO webhook_outbox (event_type, payload, traceparent, tracestate) "
        "VALUES ('t', '{}', $1, 'k=v'), ('u', '{}', NULL, NULL)",
        parent,
    )
    await repo.route(10)
    jobs = {j.event_type: j for j in await repo.claim("w", 10, 30)}
    assert (jobs["t"].traceparent, jobs["t"].tracestate) == (parent, "k=v")
    assert (jobs["u"].traceparent, jobs["u"].tracestate) == (None, None)


async def test_a_capped_subscriber_drains_without_any_timer(
    start_dispatcher: Any, pool: Any, receiver: support.Receiver
) -> None:
    """Poll once a minute: only the event-driven refill (a finished request of a capped
    subscription claims its successor in the round trip of its ack) can drain this."""
    repo = repository.Repository(pool)
    await repo.create_subscription(
        url=receiver.url, event_types=["*"], secret=SECRET, max_in_flight=2
    )
    running = await start_dispatcher(poll_interval_seconds=60.0)
    try:
        async with pool.acquire() as conn, conn.transaction():
            for i in range(40):
                await dispatcher.publish(conn, "e", {"i": i})
        await support.wait_for(lambda: len(receiver.ok()) >= 40, timeout=30)
    finally:
        await running.stop()
    assert await _counter_drift(pool) == []


async def test_a_burst_over_many_subscriptions_goes_out_without_waiting_for_the_poll(
    start_dispatcher: Any, pool: Any, receiver: support.Receiver
) -> None:
    """One event each for 40 subscriptions with room for 5: a claim must visit as many
    subscriptions as it takes to fill itself. Counting each one's room instead of its work,
    a claim of 10 took 2 and came back short, which read as "no more work" until the poll
    (here once a minute)."""
    repo = repository.Repository(pool)
    for _ in range(40):
        await repo.create_subscription(
            url=receiver.url, event_types=["*"], secret=SECRET, max_in_flight=5
        )
    running = await start_dispatcher(poll_interval_seconds=60.0, max_in_flight=10)
    try:
        async with pool.acquire() as conn:
            await dispatcher.publish(conn, "e", {})
        await support.wait_for(lambda: len(receiver.ok()) >= 40, timeout=15)
    finally:
        await running.stop()


async def test_routing_wakes_the_claimers_in_its_one_statement(pool: Any, dsn: str) -> None:
    repo = repository.Repository(pool)
    await repo.create_subscription(url="http://127.0.0.1:1/", event_types=["*"], secret=SECRET)
    heard: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        await conn.add_listener(repository.WORK_CHANNEL, lambda *args: heard.append(args[2]))
        async with pool.acquire() as c:
            await dispatcher.publish(c, "e", {})
        assert (await repo.route(10)).deliveries == 1
        await support.wait_for(lambda: heard, message="a work notification")
        heard.clear()
        # Nothing routed to anyone: no wake-up.
        await pool.execute("INSERT INTO webhook_outbox (event_type, payload) VALUES ('x', '{}')")
        await pool.execute("UPDATE webhook_subscriptions SET enabled = false")
        assert (await repo.route(10)).deliveries == 0
        await conn.execute("SELECT 1")  # a round trip: a pending notification would be in
        assert heard == []
    finally:
        await conn.close()


async def test_an_unreadable_row_is_quarantined_and_the_rest_keeps_flowing(
    server_dsn: str, receiver: support.Receiver
) -> None:
    """In a SQL_ASCII database a payload with bytes that are not UTF-8 cannot be sent to the
    client: every claim that reached it used to fail. It is dead-lettered alone, with an
    error that does not quote it, and every other event is delivered."""
    async with support.sql_ascii_database(server_dsn) as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            repo = repository.Repository(pool)
            await repo.create_subscription(url=receiver.url, event_types=["*"], secret=SECRET)
            await pool.execute(
                "INSERT INTO webhook_outbox (event_id, event_type, payload) "
                "SELECT 'evt_' || g, 'e', '{}' FROM generate_series(1, 5) g"
            )
            await pool.execute(
                "INSERT INTO webhook_outbox (event_id, event_type, payload) "
                "VALUES ('evt_bad', 'e', E'{\"k\": \"\\xff\\xfe\"}')"
            )
            await pool.execute(
                "INSERT INTO webhook_outbox (event_id, event_type, payload) "
                "SELECT 'evt_' || g, 'e', '{}' FROM generate_series(6, 10) g"
            )
            d = app.Dispatcher(conftest.fast_settings(dsn))
            stop = asyncio.Event()
            task = asyncio.create_task(d.run(stop))
            try:
                await support.wait_for(
                    lambda: pool.fetchval(
                        "SELECT count(*) = 11 FROM webhook_deliveries "
                        "WHERE state IN ('delivered', 'dead')"
                    ),
                    timeout=30,
                    message="every delivery finished",
                )
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
            dead = await pool.fetch(
                "SELECT o.event_id, d.last_error FROM webhook_deliveries d "
                "JOIN webhook_outbox o ON o.id = d.outbox_id WHERE d.state = 'dead'"
            )
            assert [r["event_id"] for r in dead] == ["evt_bad"]
            assert "unreadable row" in dead[0]["last_error"]
            assert "0xff" not in dead[0]["last_error"]
            assert sorted(receiver.ids()) == sorted(f"evt_{g}" for g in range(1, 11))
        finally:
            await pool.close()


async def test_a_capped_subscriptions_next_slot_goes_to_the_replica_waiting_for_it(
    pool: Any,
) -> None:
    repo = repository.Repository(pool)
    await repo.create_subscription(
        url="http://127.0.0.1:1/", event_types=["*"], secret=SECRET, max_in_flight=2
    )
    async with pool.acquire() as conn:
        for i in range(6):
            await dispatcher.publish(conn, "e", {"i": i})
    await repo.route(10)
    held_by_a = await repo.claim("a", 10, 30)
    assert len(held_by_a) == 2
    assert await repo.claim("b", 10, 30) == []  # at its cap: b now waits for a slot
    # a's ack frees a slot; a's own refill in the same round trip leaves it to b, once.
    _, refill = await repo.complete_and_claim([_ack(held_by_a[0])], "a", 10, 30)
    assert refill == []
    taken_by_b = await repo.claim("b", 10, 30)
    assert len(taken_by_b) == 1
    # The wait was answered: a's next freed slot is a's again.
    _, refill = await repo.complete_and_claim([_ack(held_by_a[1])], "a", 10, 30)
    assert len(refill) == 1
    assert await _counter_drift(pool) == []


async def test_a_claim_loop_that_keeps_failing_shows_in_readiness_and_metrics(
    start_dispatcher: Any, pool: Any
) -> None:
    """The database answers pings, but every claim fails (here: the claim function is gone)."""
    running = await start_dispatcher()
    base = f"http://127.0.0.1:{running.dispatcher.bound_port}"

    async def probe() -> tuple[int, str, str]:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/readyz") as ready:
                body = await ready.json()
            async with session.get(base + "/metrics") as resp:
                metrics_text = await resp.text()
        return ready.status, body["reason"], metrics_text

    def failing_seconds(text: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith("dispatcher_claim_failing_s"))
        return float(line.split()[-1])

    status, _, text = await probe()
    assert status == 200
    assert failing_seconds(text) == 0.0
    signature = "dispatcher_claim(text, integer, double precision, integer)"
    await pool.execute(f"ALTER FUNCTION {signature} RENAME TO dispatcher_claim_gone")
    try:
        running.dispatcher.claimer.wake()
        await support.wait_for(
            lambda: probe_unready(probe), timeout=15, message="readiness off while claims fail"
        )
        _, reason, text = await probe()
        assert reason.startswith("claims failing")
        assert failing_seconds(text) > 0
    finally:
        await pool.execute(
            "ALTER FUNCTION dispatcher_claim_gone(text, integer, double precision, integer) "
            "RENAME TO dispatcher_claim"
        )
    await support.wait_for(lambda: probe_ready(probe), timeout=15, message="ready again")


async def probe_unready(probe: Any) -> bool:
    status, reason, _ = await probe()
    return status == 503 and reason.startswith("claims failing")


async def probe_ready(probe: Any) -> bool:
    status, _, _ = await probe()
    return status == 200
