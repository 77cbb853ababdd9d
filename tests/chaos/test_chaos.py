"""Chaos scenarios, each judged by the oracle (database, receiver log and /metrics).

Short form in ``make test``; ``make chaos`` (DISPATCHER_CHAOS_LONG=1) runs more seeds and
bigger backlogs. Every scenario records one row of the table printed at the end.
Real processes, real sockets, loopback only; Postgres restarts only ever hit a throwaway
server this module starts in a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import prometheus_client as prom
import pytest
import standardwebhooks

from dispatcher import app, config, ports, secretbox
from dispatcher.db import pool as db_pool
from dispatcher.db import repository
from tests import support
from tests.chaos import oracle
from tests.chaos import receiver as rx
from tests.chaos.conftest import LONG, record
from tests.chaos.receiver import ChaosReceiver
from tests.conftest import fast_settings
from tests.integration.test_ssrf_canary import Canary, canary, loopback_spellings

__all__ = ["canary"]  # the canary fixture, shared with the SSRF integration tests

MANY_RETRIES = config.RetryPolicy(
    base_seconds=0.01, cap_seconds=0.1, max_attempts=1000, max_4xx_attempts=2
)


# -- helpers ----------------------------------------------------------------------------------


async def publish(
    pool: Any, n: int, *, sub: str | None = None, keys: int = 0, event_type: str = "e.x"
) -> None:
    """n events in one statement (ordering keys k0..k{keys-1} round robin when keys > 0)."""
    await pool.execute(
        """
        INSERT INTO webhook_outbox (event_type, payload, subscription_id, ordering_key)
        SELECT $1, jsonb_build_object('i', g, 'pad', repeat('x', 64)), $2::uuid,
               CASE WHEN $3 > 0 THEN 'k' || (g % $3) END
        FROM generate_series(1, $4) g
        """,
        event_type,
        sub,
        keys,
        n,
    )


async def count_state(pool: Any, *states: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE state = ANY($1::text[])", list(states)
        )
    )


async def wait_state(pool: Any, n: int, *states: str, timeout: float = 30) -> None:
    async def done() -> bool:
        return await count_state(pool, *states) >= n

    await support.wait_for(done, timeout=timeout, interval=0.05, message=f"{n} {states}")


def text_of(running: Any) -> str:
    return prom.generate_latest(running.dispatcher.registry).decode()


def spawn(
    dsn: str, tmp_path: Path, name: str, **env: str
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = ports.free_port()
    log = tmp_path / f"{name}.log"
    proc = support.spawn_dispatcher(
        dsn,
        extra_env={"DISPATCHER_LISTEN": f"127.0.0.1:{port}", "DISPATCHER_WORKER_ID": name, **env},
        log_path=log,
    )
    return proc, port, log


async def scrape(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()


async def wait_ready(port: int, timeout: float = 20) -> None:
    async def ready() -> bool:
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(
                    f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=1)
                ) as r,
            ):
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    await support.wait_for(ready, timeout=timeout, interval=0.1, message="replica ready")


def kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
    kill_all(started)


CHILD_ENV = {
    "DISPATCHER_REQUEST_TIMEOUT": "2",
    "DISPATCHER_CONNECT_TIMEOUT": "1",
    "DISPATCHER_LEASE_MARGIN": "0.5",
    "DISPATCHER_MAX_ATTEMPTS": "1000",
}


# -- processes dying --------------------------------------------------------------------------


SEEDS = [11, 12, 13, 14, 15] if LONG else [11]


@pytest.mark.parametrize("seed", SEEDS)
async def test_sigkill_one_of_three_replicas_at_a_random_point(  # noqa: PLR0917
    pool: Any, dsn: str, chaos: ChaosReceiver, tmp_path: Path, procs: list[Any], seed: int
) -> None:
    rng = random.Random(seed)
    n = 1500 if LONG else 300
    chaos.modes["a"] = rx.Mode("slow", delay=0.01)
    sid = await support.subscribe(pool, chaos.url("a"), max_in_flight=6)
    await publish(pool, n, keys=10)
    started = [spawn(dsn, tmp_path, f"r{seed}-{i}", **CHILD_ENV) for i in range(3)]
    procs += [p for p, _port, _log in started]
    kill_at = rng.randint(n // 10, n // 2)
    await support.wait_for(lambda: len(chaos.ok("a")) >= kill_at, timeout=60, message="kill point")
    victim = rng.randrange(3)
    killed_at = time.monotonic()
    started[victim][0].send_signal(signal.SIGKILL)
    await wait_state(pool, n, "delivered", timeout=90)
    recovery = time.monotonic() - killed_at
    v = await oracle.check(pool, chaos, {sid: "a"})
    v.assert_sound(max_duplicates=6)
    record(
        f"SIGKILL 1 of 3 replicas (seed {seed}, {n} events, 10 keys)",
        v,
        f"killed r{victim} after {kill_at} receipts; all delivered {recovery:.1f}s after the kill",
    )


async def test_crash_after_send_before_ack(
    pool: Any, dsn: str, chaos: ChaosReceiver, tmp_path: Path, procs: list[Any]
) -> None:
    sid = await support.subscribe(pool, chaos.url("a"), max_in_flight=1)
    await publish(pool, 20)
    first, _port, _log = spawn(dsn, tmp_path, "crashing", **CHILD_ENV)
    procs.append(first)

    def crash_on_tenth(n: int) -> rx.Mode:
        if n == 9:
            first.kill()  # the request arrived; the sender dies before it can ack
        return rx.OK

    chaos.modes["a"] = crash_on_tenth
    await support.wait_for(lambda: first.poll() is not None, timeout=30, message="crash")
    crashed_at = time.monotonic()
    second, _port, _log = spawn(dsn, tmp_path, "successor", **CHILD_ENV)
    procs.append(second)
    await wait_state(pool, 20, "delivered", timeout=30)
    recovery = time.monotonic() - crashed_at
    v = await oracle.check(pool, chaos, {sid: "a"})
    v.assert_sound(max_duplicates=1)
    assert v.duplicates == 1  # exactly the request that was on the wire, byte-identical
    record(
        "crash after send, before ack",
        v,
        f"1 resend with the same id and bytes; recovered in {recovery:.1f}s (lease 2.5s)",
    )


@pytest.mark.skipif(not LONG, reason="long form only (DISPATCHER_CHAOS_LONG=1)")
async def test_poison_delivery_that_kills_every_worker_is_dead_lettered(
    pool: Any, dsn: str, chaos: ChaosReceiver, tmp_path: Path, procs: list[Any]
) -> None:
    sid = await support.subscribe(pool, chaos.url("a"), max_in_flight=1)
    await publish(pool, 1)
    env = {**CHILD_ENV, "DISPATCHER_MAX_ATTEMPTS": "3"}
    current: dict[str, subprocess.Popen[bytes]] = {}

    def poison(_n: int) -> rx.Mode:
        current["p"].kill()
        return rx.OK

    chaos.modes["a"] = poison
    started = time.monotonic()
    for i in range(6):
        # A fresh replica each time: the reaper dead-letters once the attempt limit is hit
        # (the counter moved at claim time, so crashes count), otherwise it sends and dies.
        proc, _port, _log = spawn(dsn, tmp_path, f"poisoned-{i}", **env)
        procs.append(proc)
        current["p"] = proc

        async def crashed_or_dead(p: subprocess.Popen[bytes] = proc) -> bool:
            return p.poll() is not None or await count_state(pool, "dead") == 1

        await support.wait_for(crashed_or_dead, timeout=30, message="crash or dead letter")
        if await count_state(pool, "dead") == 1:
            break
    attempts = await pool.fetchval("SELECT attempt FROM webhook_deliveries")
    v = await oracle.check(pool, chaos, {sid: "a"}, expect_delivered=False)
    record(
        "poison delivery crashing every worker",
        v,
        f"dead after {attempts} attempts ({len(chaos.log)} sends), "
        f"{time.monotonic() - started:.1f}s",
    )
    assert attempts == 3


async def test_sigterm_drains_what_is_on_the_wire(
    pool: Any, dsn: str, chaos: ChaosReceiver, tmp_path: Path, procs: list[Any]
) -> None:
    chaos.modes["a"] = rx.Mode("slow", delay=0.5)
    sid = await support.subscribe(pool, chaos.url("a"), max_in_flight=4)
    await publish(pool, 4)
    proc, port, log = spawn(dsn, tmp_path, "drain", **CHILD_ENV)
    procs.append(proc)
    await support.wait_for(
        lambda: chaos.concurrent.get("a", 0) == 4, timeout=20, message="4 on wire"
    )
    text = await scrape(port)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 20)
    drained = time.monotonic() - began
    assert code == 0, log.read_text()[-2000:]
    v = await oracle.check(pool, chaos, {sid: "a"})
    v.assert_sound()
    assert "dispatcher_draining" in log.read_text()
    assert oracle.metric_sum([text], "dispatcher_in_flight") == 4
    record("SIGTERM drain", v, f"4 in flight finished, exit 0 after {drained:.2f}s, no resend")


async def test_stale_worker_paused_past_its_lease_is_fenced(
    pool: Any, dsn: str, chaos: ChaosReceiver, tmp_path: Path, procs: list[Any]
) -> None:
    chaos.modes["a"] = rx.Mode("slow", delay=0.3)
    sid = await support.subscribe(pool, chaos.url("a"), max_in_flight=4)
    env = {**CHILD_ENV, "DISPATCHER_REQUEST_TIMEOUT": "1"}
    stale, _p, _l = spawn(dsn, tmp_path, "stale", **env)
    procs.append(stale)
    await publish(pool, 4)
    await support.wait_for(
        lambda: chaos.concurrent.get("a", 0) == 4, timeout=20, message="stale worker sending"
    )
    stale.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    other, _p, _l = spawn(dsn, tmp_path, "other", **env)
    procs.append(other)
    await wait_state(pool, 4, "delivered", timeout=30)
    stale.send_signal(signal.SIGCONT)

    async def fenced() -> int:
        return int(await pool.fetchval("SELECT count(*) FROM webhook_attempts WHERE NOT applied"))

    await support.wait_for(fenced, timeout=20, message="the stale worker's acks")
    v = await oracle.check(pool, chaos, {sid: "a"})
    v.assert_sound(max_duplicates=4)
    record(
        "stale worker (SIGSTOP) past its lease",
        v,
        f"{await fenced()} stale results fenced (applied=false); "
        f"taken over {time.monotonic() - stopped_at:.1f}s after the stop",
    )


# -- Postgres faults --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def throwaway_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Postgres this module owns (its own data directory), so it may be restarted."""
    import warnings

    import pgserver
    from pgserver._commands import pg_ctl

    data = tmp_path_factory.mktemp("pg") / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(data, cleanup_mode="stop")
    yield server
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server.cleanup()
    # The tests restart the server with pg_ctl, so pgserver no longer knows the postmaster it
    # would stop: stop whatever runs on this data directory, or it outlives the test run.
    with contextlib.suppress(Exception):
        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=server.pgdata, user=server.system_user)


@pytest.fixture
async def owned_dsn(throwaway_pg: Any) -> str:
    name = f"chaos_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(throwaway_pg.get_uri())
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = throwaway_pg.get_uri(name)
    await app.migrate_database(dsn)
    return dsn


async def run_dispatcher(settings: config.Settings) -> tuple[app.Dispatcher, asyncio.Event, Any]:
    d = app.Dispatcher(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    await asyncio.wait_for(d.ready.wait(), 20)
    return d, stop, task


class Producer:
    """Publishes one event every few ms, retrying through outages (like an app would)."""

    def __init__(self, dsn: str, sub: str) -> None:
        self.dsn, self.sub = dsn, sub
        self.published = 0
        self.failures = 0
        self._stop = asyncio.Event()

    async def run(self, n: int) -> None:
        conn: Any = None
        while self.published < n and not self._stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn)
                await conn.execute(
                    "INSERT INTO webhook_outbox (event_type, payload, subscription_id)"
                    " VALUES ('e.x', jsonb_build_object('i', $1::int), $2::uuid)",
                    self.published,
                    self.sub,
                )
                self.published += 1
            except db_pool.ERRORS:
                self.failures += 1
                conn = None
            await asyncio.sleep(0.005)  # the producer's own pace
        if conn is not None and not conn.is_closed():
            await conn.close()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restart(
    throwaway_pg: Any, owned_dsn: str, chaos: ChaosReceiver, mode: str
) -> None:
    from pgserver._commands import pg_ctl

    n = 300 if LONG else 150  # the producer is still publishing when the server goes down
    pool = await asyncpg.create_pool(owned_dsn, min_size=1, max_size=2)
    try:
        sid = await support.subscribe(pool, chaos.url("a"))
        d, stop, task = await run_dispatcher(fast_settings(owned_dsn))
        producer = Producer(owned_dsn, sid)
        produce = asyncio.create_task(producer.run(n))
        await support.wait_for(lambda: len(chaos.ok("a")) >= 50, timeout=20, message="flowing")
        began = time.monotonic()
        await asyncio.to_thread(
            pg_ctl,
            ["-m", mode, "-w", "restart"],
            pgdata=throwaway_pg.pgdata,
            user=throwaway_pg.system_user,
        )
        back = time.monotonic()
        before = len(chaos.ok("a"))
        await support.wait_for(
            lambda: len(chaos.ok("a")) > before, timeout=30, message="deliveries resume"
        )
        resumed = time.monotonic() - back
        await asyncio.wait_for(produce, 60)
        await pool.expire_connections()
        await wait_state(pool, n, "delivered", timeout=30)
        metrics_text = text_of(type("R", (), {"dispatcher": d})())
        stop.set()
        await asyncio.wait_for(task, 30)
        v = await oracle.check(pool, chaos, {sid: "a"}, metrics_texts=[metrics_text])
        v.assert_sound(max_duplicates=10)
        record(
            f"Postgres restart ({mode})",
            v,
            f"server down {back - began:.2f}s; deliveries resumed {resumed:.2f}s after it was "
            f"back; producer retried {producer.failures}x",
        )
    finally:
        await pool.close()


async def test_backends_terminated_while_delivering(
    pool: Any, chaos: ChaosReceiver, start_dispatcher: Any
) -> None:
    chaos.modes["a"] = rx.Mode("slow", delay=0.005)
    sid = await support.subscribe(pool, chaos.url("a"))
    running = await start_dispatcher()
    terminated = 0
    last = 0.0
    for _ in range(3):
        await publish(pool, 100)
        await support.wait_for(lambda: len(chaos.ok("a")) >= 20, timeout=10, message="flowing")
        terminated += int(
            await pool.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE 'dispatcher%'"
                " AND pid <> pg_backend_pid()"
            )
        )
        last = time.monotonic()
    await wait_state(pool, 300, "delivered", timeout=30)
    recovery = time.monotonic() - last
    v = await oracle.check(pool, chaos, {sid: "a"}, metrics_texts=[text_of(running)])
    v.assert_sound(max_duplicates=10)
    record(
        "backends terminated (3 rounds)",
        v,
        f"{terminated} dispatcher backends killed; drained {recovery:.2f}s after the last",
    )


async def test_listen_connection_lost_while_events_arrive(
    pool: Any, chaos: ChaosReceiver, start_dispatcher: Any
) -> None:
    sid = await support.subscribe(pool, chaos.url("a"))
    # A slow poll: only NOTIFY (or the rescan after a reconnect) makes delivery quick.
    running = await start_dispatcher(poll_interval_seconds=2.0)
    await publish(pool, 10)
    await wait_state(pool, 10, "delivered", timeout=10)
    killed = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'dispatcher-listen'"
    )
    began = time.monotonic()
    await publish(pool, 50)  # arrives while the listener is gone
    await wait_state(pool, 60, "delivered", timeout=10)
    took = time.monotonic() - began
    v = await oracle.check(pool, chaos, {sid: "a"}, metrics_texts=[text_of(running)])
    v.assert_sound()
    assert killed == 1
    assert took < 2.0, f"took {took:.2f}s: waited for the poll instead of the rescan"
    record(
        "LISTEN connection lost while events arrive",
        v,
        f"50 events delivered {took:.2f}s after the kill (poll interval 2s)",
    )


# -- receivers misbehaving --------------------------------------------------------------------


FAST_HEALTH = config.EndpointHealthPolicy(
    disable_after_seconds=0,
    breaker_failure_ratio=0.5,
    breaker_min_attempts=10,
    breaker_window_seconds=5,
    pause_seconds=0.3,
    max_pause_seconds=0.6,
    interval_seconds=0.05,
)


async def test_flaky_then_down_then_healthy(
    pool: Any, chaos: ChaosReceiver, start_dispatcher: Any
) -> None:
    phase = {"now": "flaky"}
    flaky = rx.flaky(0.3, seed=7)

    def behave(n: int) -> rx.Mode:
        return {"flaky": flaky(n), "down": rx.DOWN, "healthy": rx.OK}[phase["now"]]

    chaos.modes["a"] = behave
    sid = await support.subscribe(pool, chaos.url("a"), max_in_flight=4)
    n = 600 if LONG else 200
    await publish(pool, n, keys=5)
    running = await start_dispatcher(retry=MANY_RETRIES, endpoint_health=FAST_HEALTH)
    await support.wait_for(lambda: len(chaos.log) >= 60, timeout=20, message="flaky phase")
    phase["now"] = "down"
    down_at = len(chaos.log)

    async def paused() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT paused_until > now() FROM webhook_subscriptions WHERE id = $1::uuid", sid
            )
        )

    await support.wait_for(paused, timeout=20, message="breaker open while down")
    await support.wait_for(
        lambda: len(chaos.log) >= down_at + 3, timeout=10, message="probes while down"
    )
    phase["now"] = "healthy"
    healthy_at = time.monotonic()
    await wait_state(pool, n, "delivered", timeout=60)
    recovery = time.monotonic() - healthy_at
    sent_while_down = sum(1 for e in chaos.log[down_at:] if e.status == -2)
    pauses = await pool.fetchval(
        "SELECT count(*) FROM webhook_subscription_events WHERE kind = 'paused'"
    )
    v = await oracle.check(pool, chaos, {sid: "a"}, metrics_texts=[text_of(running)])
    v.assert_sound()
    record(
        f"flaky (30%) → down → healthy ({n} events, 5 keys)",
        v,
        f"{pauses} breaker pauses, {sent_while_down} requests while down; "
        f"drained {recovery:.2f}s after recovery",
    )


async def test_400_410_429(pool: Any, chaos: ChaosReceiver, start_dispatcher: Any) -> None:
    chaos.modes["bad"] = rx.status(400)
    chaos.modes["gone"] = rx.status(410)
    chaos.modes["busy"] = lambda n: rx.status(429, Retry_After="1") if n < 2 else rx.OK
    subs = {
        await support.subscribe(pool, chaos.url(name), event_types=(f"{name}.x",)): name
        for name in ("bad", "gone", "busy")
    }
    for name in ("bad", "gone", "busy"):
        await publish(pool, 3 if name != "busy" else 1, event_type=f"{name}.x")
    running = await start_dispatcher()
    await wait_state(pool, 3, "dead", timeout=20)
    await wait_state(pool, 1, "delivered", timeout=20)

    async def gone_disabled() -> bool:
        return (
            await pool.fetchval("SELECT count(*) FROM webhook_subscriptions WHERE NOT enabled") == 1
        )

    await support.wait_for(gone_disabled, timeout=10, message="410 disabled")
    busy = chaos.entries("busy")
    gap = busy[2].at - busy[1].at
    assert gap >= 0.9, f"Retry-After not honoured: {gap:.2f}s"
    bad = chaos.entries("bad")
    assert len(bad) == 3 * 2  # max_4xx_attempts = 2 each
    parked_or_held = await count_state(pool, "parked", "retrying")
    assert parked_or_held + await count_state(pool, "parked") >= 2
    text = text_of(running)
    assert oracle.metric_sum([text], "dispatcher_attempts_total", outcome="http_429") == 2
    assert oracle.metric_sum([text], "dispatcher_attempts_total", outcome="http_4xx") == len(
        bad
    ) + len(chaos.entries("gone"))
    busy_sid = next(k for k, v in subs.items() if v == "busy")
    v = await oracle.check(pool, chaos, {busy_sid: "busy"})
    v.assert_sound()
    record(
        "400 / 410 / 429 answers",
        v,
        f"400: dead after 2 attempts each; 410: disabled, work parked; "
        f"429 Retry-After 1s honoured (gap {gap:.2f}s)",
    )


async def test_blackhole_trickle_and_slow_headers_end_at_the_deadline(
    pool: Any, chaos: ChaosReceiver, start_dispatcher: Any
) -> None:
    chaos.modes["hole"] = rx.BLACKHOLE
    chaos.modes["trickle"] = rx.Mode("trickle", delay=0.1)
    chaos.modes["slowhdr"] = rx.Mode("slow", delay=30)
    names = {}
    for name in ("hole", "trickle", "slowhdr"):
        names[await support.subscribe(pool, chaos.url(name), event_types=(f"{name}.x",))] = name
        await publish(pool, 2, event_type=f"{name}.x")
    retry = config.RetryPolicy(base_seconds=0.01, cap_seconds=0.05, max_attempts=2)
    await start_dispatcher(request_timeout_seconds=1.0, connect_timeout_seconds=0.5, retry=retry)
    await wait_state(pool, 6, "dead", timeout=30)
    worst_ms = float(await pool.fetchval("SELECT max(duration_ms) FROM webhook_attempts"))
    outcomes = {
        r["outcome"] for r in await pool.fetch("SELECT DISTINCT outcome FROM webhook_attempts")
    }
    assert worst_ms <= 1000 + 300, worst_ms
    assert outcomes == {"timeout"}, outcomes
    v = await oracle.check(pool, chaos, names, expect_delivered=False)
    v.assert_sound(max_duplicates=6)  # each timed-out request was resent once (same bytes)
    record(
        "blackhole / trickling body / slow headers",
        v,
        f"longest attempt {worst_ms / 1000:.2f}s against a 1.0s deadline; "
        f"trickle sent {chaos.bytes_sent} bytes in all",
    )


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_huge_and_gzip_bomb_responses_keep_memory_bounded(
    pool: Any, dsn: str, chaos: ChaosReceiver, tmp_path: Path, procs: list[Any]
) -> None:
    huge_mb = 512 if LONG else 128
    chaos.modes["huge"] = rx.Mode("huge", size=huge_mb << 20)
    # 1 KiB of gzip per MiB of zeros: ~8 MiB on the wire would inflate to ~8 GiB.
    chaos.modes["bomb"] = rx.Mode("gzip", size=8 << 20)
    names = {}
    for name in ("huge", "bomb"):
        names[await support.subscribe(pool, chaos.url(name), event_types=(f"{name}.x",))] = name
        await publish(pool, 10, event_type=f"{name}.x")
    proc, port, _log = spawn(dsn, tmp_path, "memory", **CHILD_ENV)
    procs.append(proc)
    await wait_ready(port)
    baseline = _vm_hwm_mb(proc.pid)
    await wait_state(pool, 20, "delivered", timeout=60)
    peak = _vm_hwm_mb(proc.pid)
    text = await scrape(port)
    v = await oracle.check(pool, chaos, names, metrics_texts=[text])
    v.assert_sound()
    offered_mb = 10 * huge_mb + 10 * 8 * 1024
    assert peak - baseline < 64, (baseline, peak)
    assert chaos.bytes_sent < 20 * (8 << 20)  # the client hung up early
    record(
        "huge body and gzip bomb responses",
        v,
        f"peak RSS {peak:.0f} MiB (+{peak - baseline:.1f} over idle) while offered "
        f"~{offered_mb / 1024:.0f} GiB decoded",
    )


async def test_redirects_are_not_followed(
    pool: Any, chaos: ChaosReceiver, canary: Canary, start_dispatcher: Any
) -> None:
    # The canary is on allow-listed 127.0.0.1: only not following the redirect keeps it dark.
    chaos.modes["moved"] = rx.Mode("redirect", location=f"http://127.0.0.1:{canary.port}/x")
    sid = await support.subscribe(pool, chaos.url("moved"))
    await publish(pool, 3)
    await start_dispatcher()
    await wait_state(pool, 3, "dead", timeout=20)
    statuses = {
        r["last_status"] for r in await pool.fetch("SELECT last_status FROM webhook_deliveries")
    }
    assert statuses == {302}
    assert canary.connections == 0
    v = await oracle.check(pool, chaos, {sid: "moved"}, expect_delivered=False)
    v.assert_sound()
    record("redirects (302 → allow-listed canary)", v, f"canary hits {canary.connections}")


async def test_ssrf_table_through_the_running_dispatcher(
    pool: Any, canary: Canary, start_dispatcher: Any
) -> None:
    urls = loopback_spellings(canary.port)
    assert len(urls) >= 40
    repo = repository.Repository(pool)
    for url in urls:
        # Straight into the table: rows that predate a policy change, or a DNS answer that
        # changed since creation, must still be refused at every attempt.
        await repo.create_subscription(url=url, event_types=["ssrf.x"], secret=support.SECRET)
    await publish(pool, 1, event_type="ssrf.x")
    running = await start_dispatcher(allow_cidrs=())
    await wait_state(pool, len(urls), "dead", timeout=30)
    outcomes = {r["outcome"] for r in await pool.fetch("SELECT outcome FROM webhook_attempts")}
    blocked = oracle.metric_sum([text_of(running)], "dispatcher_ssrf_blocked_total")
    assert outcomes == {"blocked"}
    assert blocked == len(urls)
    assert canary.connections == 0
    record(
        f"SSRF table ({len(urls)} loopback spellings)",
        oracle.Verdict(),
        f"{int(blocked)} attempts blocked, dead at once; canary hits {canary.connections}",
    )


async def test_slow_subscriber_does_not_slow_the_others(
    pool: Any, chaos: ChaosReceiver, start_dispatcher: Any
) -> None:
    chaos.modes["slow"] = rx.Mode("slow", delay=2.0)
    await support.subscribe(pool, chaos.url("slow"), max_in_flight=2, event_types=("slow.x",))
    fast = await support.subscribe(pool, chaos.url("fast"), event_types=("fast.x",))
    await publish(pool, 100, event_type="slow.x")
    await start_dispatcher()
    await support.wait_for(
        lambda: chaos.concurrent.get("slow", 0) == 2, timeout=10, message="slow busy"
    )
    n = 500 if LONG else 200
    began = time.monotonic()
    await publish(pool, n, event_type="fast.x")

    async def fast_done() -> bool:
        return (
            await pool.fetchval(
                "SELECT count(*) FROM webhook_deliveries"
                " WHERE subscription_id = $1::uuid AND state = 'delivered'",
                fast,
            )
            >= n
        )

    await support.wait_for(fast_done, timeout=30, message="fast subscriber drained")
    took = time.monotonic() - began
    assert chaos.max_concurrent["slow"] == 2
    assert took < 5.0, took
    v = await oracle.check(pool, chaos, {fast: "fast"})
    v.assert_sound()
    record(
        "slow subscriber (2 s/answer) beside a fast one",
        v,
        f"fast: {n} delivered in {took:.2f}s while slow held its 2 slots; "
        f"slow delivered {len(chaos.ok('slow'))}/100 meanwhile",
    )


async def test_backlog_released_after_an_outage_respects_the_cap(
    pool: Any, chaos: ChaosReceiver, start_dispatcher: Any
) -> None:
    n = 10_000 if LONG else 400
    cap = 8
    chaos.modes["a"] = rx.Mode("slow", delay=0.002)
    sid = await support.subscribe(pool, chaos.url("a"), max_in_flight=cap)
    await publish(pool, n)  # the outage: nothing runs while the backlog builds
    began = time.monotonic()
    first = await start_dispatcher()
    second = await start_dispatcher()
    await wait_state(pool, n, "delivered", timeout=240 if LONG else 60)
    took = time.monotonic() - began
    texts = [text_of(first), text_of(second)]
    v = await oracle.check(pool, chaos, {sid: "a"}, metrics_texts=texts)
    v.assert_sound()
    peak = chaos.max_concurrent["a"]
    assert peak <= cap, peak
    record(
        f"{n} backlog after an outage, 2 replicas, cap {cap}",
        v,
        f"drained in {took:.1f}s ({n / took:.0f}/s); peak concurrency {peak}/{cap}",
    )


# -- secrets ----------------------------------------------------------------------------------


def _pg_dump_for(version_num: int) -> str:
    """A pg_dump whose major version is the server's (pgserver ships its own)."""
    import pgserver

    candidates = [
        str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"),
        "/usr/bin/pg_dump",
    ]
    for path in candidates:
        if Path(path).exists():
            out = subprocess.run(
                [path, "--version"], capture_output=True, text=True, check=True
            ).stdout
            major = int(out.split()[-1].split(".")[0])
            if major == version_num // 10000:
                return path
    pytest.skip(f"no pg_dump for server version {version_num}")
    raise AssertionError  # unreachable


async def test_secrets_absent_from_pg_dump_and_logs(
    pool: Any, dsn: str, chaos: ChaosReceiver, tmp_path: Path, procs: list[Any]
) -> None:
    k1, k2 = secretbox.generate_key(), secretbox.generate_key()
    env1 = {**CHILD_ENV, "DISPATCHER_SECRET_KEYS": f"k1:{k1}"}
    add = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "dispatcher",
            "subscriptions",
            "add",
            "--url",
            chaos.url("a"),
            "--event-type",
            "*",
            "--signature-header",
            "X-Sig",
        ],
        env={**os.environ, "DATABASE_URL": dsn, "DISPATCHER_ALLOW_CIDRS": "127.0.0.1/32", **env1},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    import orjson

    created = orjson.loads(add.stdout)
    secret, sid = created["secret"], created["id"]
    proc, _port, log = spawn(dsn, tmp_path, "secrets", **env1, DISPATCHER_LOG_LEVEL="debug")
    procs.append(proc)
    await publish(pool, 20)
    await wait_state(pool, 20, "delivered", timeout=30)
    # Rotate the master key while deliveries continue: both keys on the replica, new first.
    kill_all([proc])
    env2 = {**CHILD_ENV, "DISPATCHER_SECRET_KEYS": f"k2:{k2},k1:{k1}"}
    proc2, _port, log2 = spawn(dsn, tmp_path, "secrets2", **env2)
    procs.append(proc2)
    await publish(pool, 20)
    reenc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dispatcher", "secrets", "reencrypt"],
        env={**os.environ, "DATABASE_URL": dsn, **env2},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    await wait_state(pool, 40, "delivered", timeout=30)
    stored = await pool.fetchval(
        "SELECT secret FROM webhook_subscriptions WHERE id = $1::uuid", sid
    )
    assert stored.startswith("enc:v1:k2:")
    # Decryption gave the replicas the right secret: every request verifies independently.
    wh = standardwebhooks.Webhook(secret)
    for e in chaos.ok("a"):
        wh.verify(e.body, e.headers)
    verified = len(chaos.ok("a"))
    version = int(await pool.fetchval("SHOW server_version_num"))
    dump = await asyncio.to_thread(
        subprocess.run, [_pg_dump_for(version), "--dbname", dsn], capture_output=True, timeout=60
    )
    assert dump.returncode == 0, dump.stderr.decode()[-500:]
    needles = [secret.encode(), secret.removeprefix("whsec_").encode()]
    haystacks = {
        "pg_dump": dump.stdout,
        "logs": log.read_bytes()
        + log2.read_bytes()
        + reenc.stderr.encode()
        + reenc.stdout.encode(),
    }
    hits = {k: sum(h.count(n) for n in needles) for k, h in haystacks.items()}
    assert hits == {"pg_dump": 0, "logs": 0}, hits
    assert b"enc:v1:k2:" in dump.stdout
    assert verified >= 40
    v = await oracle.check(pool, chaos, {sid: "a"})
    v.assert_sound()
    record(
        "secrets at rest, key rotation while delivering",
        v,
        f"secret in pg_dump: {hits['pg_dump']}, in logs: {hits['logs']}; "
        f"reencrypt {orjson.loads(reenc.stdout)['resealed']} row(s) k1→k2, 40/40 delivered",
    )


async def test_foreign_key_secret_parks_alone_and_nothing_is_lost(
    pool: Any, dsn: str, chaos: ChaosReceiver, tmp_path: Path, procs: list[Any]
) -> None:
    """Mid-rotation: a subscription sealed under k2 reaches a replica that holds only k1. Its
    deliveries park with the reason; the replica stays up and the other subscriptions deliver
    with one attempt each. Once the replica holds k2, enabling re-queues the parked work."""
    k1, k2 = secretbox.generate_key(), secretbox.generate_key()
    old = secretbox.SecretBox.from_spec(f"k1:{k1}")
    new = secretbox.SecretBox.from_spec(f"k2:{k2},k1:{k1}")
    names: dict[str, str] = {}
    for name, box in (("plain1", old), ("sealed", new), ("plain2", old)):
        sub = await repository.Repository(pool, box=box).create_subscription(
            url=chaos.url(name), event_types=["*"], secret=support.SECRET
        )
        names[str(sub["id"])] = name
    sealed = next(k for k, v in names.items() if v == "sealed")
    n = 100 if LONG else 30
    await publish(pool, n)
    proc, port, log = spawn(dsn, tmp_path, "k1only", **CHILD_ENV, DISPATCHER_SECRET_KEYS=f"k1:{k1}")
    procs.append(proc)
    await wait_state(pool, 2 * n, "delivered", timeout=30)
    await wait_state(pool, n, "parked", timeout=30)
    assert proc.poll() is None, log.read_text()[-2000:]
    attempts = await pool.fetch(
        "SELECT subscription_id::text AS sid, max(attempt) AS most, min(attempt) AS least "
        "FROM webhook_deliveries GROUP BY 1"
    )
    assert {(r["sid"], r["most"], r["least"]) for r in attempts} == {(sid, 1, 1) for sid in names}
    assert chaos.entries("sealed") == []
    text = await scrape(port)
    parked = oracle.metric_sum([text], "dispatcher_attempts_total", outcome="config_error")
    assert parked == n
    others = {k: v for k, v in names.items() if v != "sealed"}
    v_others = await oracle.check(pool, chaos, others)
    v_others.assert_sound()
    # The rotation completes: the replica restarts with k2 first, the operator re-queues.
    kill_all([proc])
    proc2, _port, _log = spawn(
        dsn, tmp_path, "k2k1", **CHILD_ENV, DISPATCHER_SECRET_KEYS=f"k2:{k2},k1:{k1}"
    )
    procs.append(proc2)
    enable = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dispatcher", "subscriptions", "enable", sealed],
        env={**os.environ, "DATABASE_URL": dsn, "DISPATCHER_SECRET_KEYS": f"k2:{k2},k1:{k1}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enable.returncode == 0, enable.stderr
    await wait_state(pool, 3 * n, "delivered", timeout=30)
    v = await oracle.check(pool, chaos, names)
    v.assert_sound()
    record(
        "foreign-key secret (sealed under a key the replica lacks)",
        v,
        f"{n} parked (config_error), replica up, other 2x{n} delivered with 1 attempt each; "
        "re-queued after the key arrived: all delivered",
    )


async def test_poison_row_is_quarantined_and_every_other_delivery_goes_out(
    server_dsn: str, chaos: ChaosReceiver, tmp_path: Path, procs: list[Any]
) -> None:
    """A SQL_ASCII database (the producer's choice) holds one outbox row whose payload is not
    UTF-8: the client cannot be handed it. A real `dispatcher run` dead-letters that one
    delivery with a reason that does not quote it, stays up, and delivers everything else
    with one attempt each."""
    async with support.sql_ascii_database(server_dsn) as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            names: dict[str, str] = {}
            for sub_name in ("a", "b", "c"):
                sub = await repository.Repository(pool).create_subscription(
                    url=chaos.url(sub_name), event_types=["e.*"], secret=support.SECRET
                )
                names[str(sub["id"])] = sub_name
            await repository.Repository(pool).create_subscription(
                url=chaos.url("p"), event_types=["poison.x"], secret=support.SECRET
            )
            n = 200 if LONG else 40
            await publish(pool, n // 2)
            await pool.execute(
                "INSERT INTO webhook_outbox (event_id, event_type, payload) "
                "VALUES ('evt_poison', 'poison.x', E'{\"k\": \"\\xff\\xfe\"}')"
            )
            await publish(pool, n - n // 2)
            proc, port, log = spawn(dsn, tmp_path, "poison", **CHILD_ENV)
            procs.append(proc)
            await wait_state(pool, 3 * n, "delivered", timeout=60)
            await wait_state(pool, 1, "dead", timeout=30)
            assert proc.poll() is None, log.read_text()[-2000:]
            dead = await pool.fetch(
                "SELECT o.event_id, d.last_error FROM webhook_deliveries d "
                "JOIN webhook_outbox o ON o.id = d.outbox_id WHERE d.state = 'dead'"
            )
            assert [r["event_id"] for r in dead] == ["evt_poison"]
            assert "\\xff" not in dead[0]["last_error"]
            most = await pool.fetchval(
                "SELECT max(attempt) FROM webhook_deliveries WHERE state = 'delivered'"
            )
            assert most == 1
            assert chaos.entries("p") == []
            v = await oracle.check(pool, chaos, names)
            v.assert_sound()
            await wait_ready(port)
            record(
                "poison row (payload the client cannot decode, SQL_ASCII database)",
                v,
                f"1 dead with a reason that does not quote it; other {3 * n} delivered with "
                "1 attempt each; process up and ready",
            )
        finally:
            kill_all(procs)
            await pool.close()
