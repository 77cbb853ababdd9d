"""Database faults: the pool and the LISTEN connection survive cut connections, an unreachable
server and terminated backends; sessions carry their timeouts. Faults are injected with the
TCP fault proxy (tests/chaos/proxy.py) in front of the test database, never by restarting a
shared server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from dispatcher.db import pool as db_pool
from dispatcher.db import repository
from tests import support
from tests.chaos.proxy import FaultProxy

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
async def proxy(dsn: str) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy.for_dsn(dsn).start()
    yield p
    await p.stop()


async def _setup(pool: Any, url: str) -> None:
    await repository.Repository(pool).create_subscription(
        url=url, event_types=["*"], secret=SECRET, max_in_flight=4
    )


async def _publish(pool: Any, n: int) -> None:
    await pool.execute(
        "INSERT INTO webhook_outbox (event_type, payload)"
        " SELECT 'e.x', jsonb_build_object('i', g) FROM generate_series(1, $1) g",
        n,
    )


async def _delivered(pool: Any, n: int) -> bool:
    got = await pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")
    return int(got) >= n


async def test_cut_connections_and_an_unreachable_server_are_survived(
    pool: Any, dsn: str, proxy: FaultProxy, receiver: support.Receiver, start_dispatcher: Any
) -> None:
    await _setup(pool, receiver.url)
    running = await start_dispatcher(database_url=proxy.dsn(dsn), poll_interval_seconds=0.5)
    await _publish(pool, 20)
    await support.wait_for(lambda: _delivered(pool, 20), timeout=10, message="before the fault")
    # A blip: every connection dropped at once.
    assert proxy.cut() >= 2
    await _publish(pool, 20)
    await support.wait_for(lambda: _delivered(pool, 40), timeout=10, message="after the cut")
    # An outage: connections dropped and new ones refused for a while.
    proxy.down()
    proxy.cut()
    await _publish(pool, 20)  # written meanwhile (the producer has its own connection)
    accepted = proxy.accepted
    down_for = time.monotonic() + 1.0
    await support.wait_for(lambda: time.monotonic() > down_for, timeout=3, message="outage")
    assert proxy.accepted == accepted  # nothing got through while down
    proxy.up()
    back = time.monotonic()
    await support.wait_for(lambda: _delivered(pool, 60), timeout=15, message="after the outage")
    assert time.monotonic() - back < 5
    assert len(set(receiver.ids())) == 60
    assert not running.task.done()


async def test_terminated_backends_are_replaced_by_the_pool(pool: Any, dsn: str) -> None:
    dispatcher_pool = await db_pool.create_pool(
        dsn, min_size=3, max_size=3, application_name="dispatcher-faults"
    )
    query = "SELECT pid FROM pg_stat_activity WHERE application_name = 'dispatcher-faults'"
    try:
        for _ in range(3):
            await dispatcher_pool.fetchval("SELECT 1")
        before = {r["pid"] for r in await pool.fetch(query)}
        killed = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'dispatcher-faults'"
        )
        assert killed == 3

        async def gone() -> bool:
            return not ({r["pid"] for r in await pool.fetch(query)} & before)

        await support.wait_for(gone, timeout=5, message="backends terminated")
        # asyncpg reconnects a slot on acquire once it has seen the socket close; a slot whose
        # close it has not read yet fails one call (ConnectionDoesNotExistError), which the
        # dispatcher's loops retry. So: each dead connection costs at most one failed call,
        # and then every call succeeds on new backends.
        outcomes = []
        for _ in range(9):
            try:
                outcomes.append(await dispatcher_pool.fetchval("SELECT 1") == 1)
            except db_pool.ERRORS:
                outcomes.append(False)
        assert outcomes.count(False) <= 3
        assert all(outcomes[-3:])
        now = {r["pid"] for r in await pool.fetch(query)}
        assert now
        assert not (now & before)
    finally:
        await dispatcher_pool.close()


async def test_dispatcher_sessions_never_jit_compile(start_dispatcher: Any) -> None:
    """On a deep backlog the claim's generic plan is costed above jit_above_cost, and JIT
    compiling it took longer than running it (the bench's 1 M backlog)."""
    running = await start_dispatcher()
    async with running.dispatcher.pool.acquire() as conn, conn.transaction():
        assert await conn.fetchval("SELECT current_setting('jit')") == "off"
        # Any statement would be compiled at this threshold if JIT were allowed.
        await conn.execute("SET LOCAL jit_above_cost = 0")
        plan = await conn.fetch("EXPLAIN (ANALYZE) SELECT count(*) FROM webhook_deliveries")
    assert not any("JIT" in r[0] for r in plan)


async def test_every_dispatcher_session_carries_its_timeouts(
    dsn: str, start_dispatcher: Any
) -> None:
    running = await start_dispatcher()
    row = await running.dispatcher.pool.fetchrow(
        "SELECT current_setting('statement_timeout') AS st,"
        " current_setting('lock_timeout') AS lt,"
        " current_setting('idle_in_transaction_session_timeout') AS it,"
        " current_setting('application_name') AS app"
    )
    assert dict(row) == {"st": "30s", "lt": "10s", "it": "1min", "app": "dispatcher"}
    listen = await db_pool.connect(dsn, application_name="dispatcher-listen")
    try:
        assert await listen.fetchval("SELECT current_setting('statement_timeout')") == "30s"
    finally:
        await listen.close()


async def test_a_statement_waiting_on_a_lock_gives_up_instead_of_hanging(dsn: str) -> None:
    holder = await asyncpg.connect(dsn)
    waiter = await db_pool.connect(dsn)
    try:
        await waiter.execute("SET lock_timeout = '200ms'")  # production: 10s, same mechanism
        tx = holder.transaction()
        await tx.start()
        await holder.execute("LOCK TABLE webhook_subscriptions IN ACCESS EXCLUSIVE MODE")
        began = time.monotonic()
        with pytest.raises(asyncpg.LockNotAvailableError):
            await waiter.fetchval("SELECT count(*) FROM webhook_subscriptions")
        assert time.monotonic() - began < 2
        await tx.rollback()
    finally:
        await holder.close()
        await waiter.close()
