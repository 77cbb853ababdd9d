"""The real CLI as subprocesses: per-subscription limits across replicas, SIGKILL recovery,
SIGTERM drain, and a stale worker's result being fenced off."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path
from typing import Any

from dispatcher import model
from dispatcher.db import repository
from tests import support


async def _count(pool: Any, state: str) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = $1", state)
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


async def test_max_in_flight_holds_across_three_replicas(
    pool: Any, dsn: str, receiver: support.Receiver, tmp_path: Path
) -> None:
    receiver.respond = lambda _n, _h, _b: (200, {}, 0.02)
    await support.subscribe(pool, receiver.url, max_in_flight=3)
    await support.publish(pool, 120)
    procs = [support.spawn_dispatcher(dsn, log_path=tmp_path / f"r{i}.log") for i in range(3)]
    try:
        await support.wait_for(
            lambda: _count_delivered(pool, 120), timeout=60, message="120 deliveries"
        )
        workers = {
            r["worker"] for r in await pool.fetch("SELECT DISTINCT worker FROM webhook_attempts")
        }
    finally:
        _stop(procs)
    assert receiver.max_concurrent <= 3, receiver.max_concurrent
    assert receiver.max_concurrent == 3  # the limit was reached, so the test could have failed
    assert len(workers) >= 2, f"only {workers} did the work; the test needs real contention"
    assert len(set(receiver.ids())) == 120


def _short_leases(*, request_timeout: float) -> dict[str, str]:
    """Settings under which a killed replica's leases expire within seconds."""
    return {
        "DISPATCHER_REQUEST_TIMEOUT": str(request_timeout),
        "DISPATCHER_CONNECT_TIMEOUT": "1",
        "DISPATCHER_LEASE_MARGIN": "0.5",
    }


async def _count_delivered(pool: Any, n: int) -> bool:
    return await _count(pool, "delivered") == n


async def test_sigkill_mid_delivery_loses_nothing(
    pool: Any, dsn: str, receiver: support.Receiver, tmp_path: Path
) -> None:
    receiver.release.clear()  # hold requests on the wire so the kill lands mid-delivery
    await support.subscribe(pool, receiver.url, max_in_flight=5)
    await support.publish(pool, 20)
    env = _short_leases(request_timeout=2)
    first = support.spawn_dispatcher(dsn, extra_env=env, log_path=tmp_path / "first.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        await support.wait_for(
            lambda: len(receiver.requests) >= 5, timeout=20, message="requests in flight"
        )
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        receiver.release.set()
        second = support.spawn_dispatcher(dsn, extra_env=env, log_path=tmp_path / "second.log")
        await support.wait_for(
            lambda: _count_delivered(pool, 20), timeout=30, message="all delivered after the kill"
        )
    finally:
        _stop([first] + ([second] if second else []))
    ids = receiver.ids()
    assert len(set(ids)) == 20
    # Duplicates exist only for what was on the wire at the kill, and they are byte-identical.
    bodies: dict[str, set[bytes]] = {}
    for r in receiver.requests:
        bodies.setdefault(r.headers["webhook-id"], set()).add(r.body)
    assert all(len(b) == 1 for b in bodies.values())
    assert len(ids) - len(set(ids)) <= 5


async def test_sigterm_drains_in_flight_requests(
    pool: Any, dsn: str, receiver: support.Receiver, tmp_path: Path
) -> None:
    receiver.respond = lambda _n, _h, _b: (200, {}, 0.5)
    await support.subscribe(pool, receiver.url, max_in_flight=4)
    await support.publish(pool, 4)
    log = tmp_path / "drain.log"
    proc = support.spawn_dispatcher(dsn, log_path=log)
    try:
        await support.wait_for(
            lambda: receiver.concurrent == 4, timeout=20, message="4 requests on the wire"
        )
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
    finally:
        _stop([proc])
    assert code == 0, log.read_text()
    assert await _count(pool, "delivered") == 4
    assert await _count(pool, "in_flight") == 0
    text = log.read_text()
    assert "dispatcher_draining" in text
    assert "dispatcher_stopped" in text
    assert len(receiver.requests) == 4  # drained, not resent


async def test_sigterm_releases_what_outlives_the_grace_period(
    pool: Any, dsn: str, receiver: support.Receiver, tmp_path: Path
) -> None:
    receiver.release.clear()
    await support.subscribe(pool, receiver.url, max_in_flight=2)
    await support.publish(pool, 2)
    proc = support.spawn_dispatcher(
        dsn, extra_env={"DISPATCHER_SHUTDOWN_GRACE": "0.2"}, log_path=tmp_path / "grace.log"
    )
    try:
        await support.wait_for(lambda: receiver.concurrent == 2, timeout=20, message="in flight")
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
    finally:
        _stop([proc])
        receiver.release.set()
    assert code == 0
    rows = await pool.fetch("SELECT state, attempt, lease_token FROM webhook_deliveries")
    assert [(r["state"], r["attempt"], r["lease_token"]) for r in rows] == [
        ("retrying", 0, None)
    ] * 2


async def test_stale_worker_ack_changes_nothing(pool: Any, dsn: str) -> None:
    """A worker paused past its lease: the reaper requeues, another worker claims, and the
    first worker's late result is fenced off by the token and counted as stale."""
    repo = repository.Repository(pool)
    await support.subscribe(pool, "http://127.0.0.1:9/", max_in_flight=1)
    await support.publish(pool, 1)
    await repo.route(10)
    [stale] = await repo.claim("paused-worker", 10, lease_seconds=0.05)
    await support.wait_for(lambda: _expired(pool), message="lease expiry")
    reclaimed = await repo.reclaim_expired(max_attempts=10)
    assert reclaimed.requeued == 1
    [fresh] = await repo.claim("live-worker", 10, lease_seconds=30)
    assert fresh.delivery_id == stale.delivery_id
    assert fresh.lease_token != stale.lease_token
    assert fresh.attempt == 2

    applied = await repo.ack([support.ack(stale, model.DeliveryState.DELIVERED)], "paused-worker")
    assert applied == set()
    row = await pool.fetchrow("SELECT state, lease_token FROM webhook_deliveries")
    assert (row["state"], row["lease_token"]) == ("in_flight", fresh.lease_token)
    logged = await pool.fetchrow("SELECT applied, worker FROM webhook_attempts")
    assert (logged["applied"], logged["worker"]) == (False, "paused-worker")

    applied = await repo.ack([support.ack(fresh, model.DeliveryState.DELIVERED)], "live-worker")
    assert applied == {fresh.delivery_id}
    assert await pool.fetchval("SELECT state FROM webhook_deliveries") == "delivered"


async def _expired(pool: Any) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT bool_and(leased_until < now()) FROM webhook_deliveries"
            " WHERE state = 'in_flight'"
        )
    )


async def test_poison_delivery_is_dead_after_the_attempt_limit(pool: Any) -> None:
    """A delivery whose worker dies every time (no ack ever) ends dead: the attempt counter
    moves at claim time and the reaper stops at the limit."""
    repo = repository.Repository(pool)
    await support.subscribe(pool, "http://127.0.0.1:9/", max_in_flight=1)
    await support.publish(pool, 1)
    await repo.route(10)
    for _ in range(3):
        jobs = await repo.claim("crashing-worker", 10, lease_seconds=0.01)
        assert len(jobs) == 1
        await support.wait_for(lambda: _expired(pool), message="lease expiry")
        await repo.reclaim_expired(max_attempts=3)
    row = await pool.fetchrow("SELECT state, attempt, last_error FROM webhook_deliveries")
    assert (row["state"], row["attempt"]) == ("dead", 3)
    assert "lease expired" in row["last_error"]


async def test_the_cap_holds_when_an_owner_holding_twice_it_is_killed(
    pool: Any, dsn: str, receiver: support.Receiver, tmp_path: Path
) -> None:
    """A subscription's owner holds up to twice its cap in claimed rows (sql/015). It is
    SIGKILLed with its cap on the wire and as many held, while a second replica waits for the
    subscription: the second takes over only as the rows come back, the receiver never sees
    more than the cap at once, and every event arrives."""
    receiver.respond = lambda _n, _h, _b: (200, {}, 0.02)
    receiver.release.clear()  # the owner's requests wait on the wire until the kill
    await support.subscribe(pool, receiver.url, max_in_flight=3)
    await support.publish(pool, 150)
    env = _short_leases(request_timeout=1)
    first = support.spawn_dispatcher(
        dsn, extra_env=env | {"DISPATCHER_WORKER_ID": "first"}, log_path=tmp_path / "first.log"
    )
    second: subprocess.Popen[bytes] | None = None

    async def state() -> Any:
        return await pool.fetchrow(
            "SELECT claim_owner, claim_waiter, in_flight_count FROM webhook_subscriptions"
        )

    async def first_owns_and_holds_twice_the_cap() -> bool:
        row = await state()
        return row["claim_owner"] == "first" and row["in_flight_count"] == 6

    async def second_waits() -> bool:
        return (await state())["claim_waiter"] == "second"

    try:
        await support.wait_for(
            first_owns_and_holds_twice_the_cap, timeout=20, message="first owns, holds 6"
        )
        second = support.spawn_dispatcher(
            dsn,
            extra_env=env | {"DISPATCHER_WORKER_ID": "second"},
            log_path=tmp_path / "second.log",
        )
        await support.wait_for(second_waits, timeout=20, message="second waiting for it")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        receiver.release.set()
        await support.wait_for(
            lambda: _count_delivered(pool, 150), timeout=60, message="all delivered"
        )
        workers = {
            r["worker"] for r in await pool.fetch("SELECT DISTINCT worker FROM webhook_attempts")
        }
    finally:
        _stop([first] + ([second] if second else []))
    assert workers == {"second"}  # the killed owner's requests were never answered in time
    assert receiver.max_concurrent == 3  # reached, and never more
    assert len(set(receiver.ids())) == 150
