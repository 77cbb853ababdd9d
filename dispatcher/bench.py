"""``dispatcher bench``: measure this machine's ceiling and how close the dispatcher gets to it.

Every run works in a fresh database created on the chosen server (``DATABASE_URL`` or the
embedded Postgres) and dropped at the end, sends traffic only to a receiver process it starts
on 127.0.0.1 (``dispatcher.bench_receiver``), and bounds every scenario in requests and time.
The dispatcher under test is the real one — ``python -m dispatcher run`` in its own process,
every feature on — so its CPU and memory are measured from ``/proc`` as its own.

Scenarios: ceiling (raw aiohttp POSTs, no database), baseline (a deliberately naive
claim → sign → gather → mark-done loop), throughput, scaling (N processes), latency,
isolation, backlog, footprint. Absolute numbers move with the machine and its load; the
ratios between scenarios of one run are what to compare.

This module never changes the dispatcher's code paths or settings beyond what its CLI
exposes, and never reads the environment itself (the CLI hands it ``env``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from dispatcher import __version__, signing

SCENARIOS = (
    "ceiling",
    "baseline",
    "throughput",
    "scaling",
    "latency",
    "isolation",
    "backlog",
    "footprint",
)
SECRET = "whsec_" + base64.b64encode(b"dispatcher-bench-secret-0123456").decode()
SIGNATURE_HEADER = "X-Bench-Signature"
NAIVE_BATCH = 100


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    scenarios: tuple[str, ...] = SCENARIOS
    events: int = 20_000  # throughput, baseline and ceiling request count
    concurrency: int = 100  # requests on the wire per process (the naive loop's batch too)
    subscriptions: int = 4
    payload_bytes: int = 512
    processes: int = 2  # scaling: compared with the 1-process throughput
    latency_rate: float = 200.0
    latency_seconds: float = 10.0
    backlog_small: int = 10_000
    backlog_large: int = 1_000_000
    isolation_events: int = 20_000
    request_timeout_seconds: float = 2.0  # isolation: how long a blackholed request holds
    footprint_pending: int = 100_000
    footprint_seconds: float = 30.0  # bound on the drain measured for CPU per delivery
    idle_seconds: float = 10.0
    scenario_timeout_seconds: float = 120.0
    json: bool = False
    quick: bool = False
    # Extra DISPATCHER_* settings for the dispatcher under test (``--set NAME=VALUE``).
    dispatcher_env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def quick_run(cls, **changes: Any) -> Options:
        """A smoke run of a few seconds in all: proves every part works; the numbers mean
        little. Most of its time is dispatcher processes starting and stopping, so the sizes
        are just big enough for every figure to be non-zero, and a scenario waits for its
        processes to stop claiming rather than to exit (``Bench.retire``)."""
        base = cls(
            events=300,
            concurrency=50,
            latency_rate=100.0,
            latency_seconds=0.4,
            backlog_small=200,
            backlog_large=2_000,
            isolation_events=300,
            request_timeout_seconds=0.3,
            footprint_pending=300,
            footprint_seconds=15.0,
            idle_seconds=0.5,
            scenario_timeout_seconds=30.0,
            quick=True,
        )
        return dataclasses.replace(base, **changes)


# -- small helpers -----------------------------------------------------------------------------


class Progress:
    """One line per step on stderr, so ``--json`` output on stdout stays clean."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    def __call__(self, message: str) -> None:
        sys.stderr.write(f"[bench {time.monotonic() - self._started:6.1f}s] {message}\n")
        sys.stderr.flush()


def with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def proc_cpu_seconds(pid: int) -> float | None:
    """On-CPU time of every thread of ``pid`` (ns precision from schedstat), or None."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def proc_memory_bytes(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid``; empty where /proc is not available."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return out


def payload_pad(size: int) -> str:
    return "x" * max(0, size - 40)


# -- the receiver process ----------------------------------------------------------------------


class ReceiverProcess:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.bench_receiver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.strip():
            raise RuntimeError("the bench receiver did not start")
        self.port = int(line)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def url(self, kind: str, tag: str, n: int = 0) -> str:
        return f"http://127.0.0.1:{self.port}/{kind}/{tag}/{n}"

    async def stats(self) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{self.port}/_stats") as resp:
            data: dict[str, Any] = orjson.loads(await resp.read())
            return data

    async def tag(self, name: str) -> dict[str, Any]:
        empty = {"count": 0, "first": 0.0, "last": 0.0, "latencies": []}
        return dict((await self.stats()).get(name, empty))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)


# -- dispatcher processes ----------------------------------------------------------------------


class Fleet:
    """``python -m dispatcher run`` times n against the bench database, logs in a temp dir."""

    def __init__(
        self, dsn: str, env: Mapping[str, str], log_dir: Path, settings: Mapping[str, str]
    ) -> None:
        self._dsn = dsn
        self._env = {k: v for k, v in env.items() if not k.startswith("DISPATCHER_")}
        self._log_dir = log_dir
        self._settings = dict(settings)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.logs: list[Path] = []
        self._terminated: set[int] = set()

    def start(self, n: int, name: str) -> None:
        for i in range(n):
            port = free_port()
            env = {
                **self._env,
                "DATABASE_URL": self._dsn,
                "DISPATCHER_LISTEN": f"127.0.0.1:{port}",
                "DISPATCHER_ALLOW_CIDRS": "127.0.0.1/32",
                "DISPATCHER_WORKER_ID": f"bench-{name}-{i}",
                "DISPATCHER_LOG_FORMAT": "json",
                "DISPATCHER_LOG_LEVEL": "info",
                "DISPATCHER_SHUTDOWN_GRACE": "1",
                **self._settings,
            }
            log_path = self._log_dir / f"{name}-{i}.log"
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dispatcher", "run"],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self.procs.append(proc)
            self.ports.append(port)
            self.logs.append(log_path)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            for proc, port, log_path in zip(self.procs, self.ports, self.logs, strict=True):
                while True:
                    if proc.poll() is not None:
                        tail = log_path.read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"dispatcher exited ({proc.returncode}):\n{tail}")
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            if resp.status == 200:
                                break
                    if time.monotonic() > deadline:
                        raise RuntimeError("dispatcher did not become ready")
                    await asyncio.sleep(0.05)  # poll interval while the process starts

    async def wait_draining(self, timeout: float = 15.0) -> None:
        """Until no process answers /readyz with 200: each has stopped claiming (or exited)."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            for proc, port in zip(self.procs, self.ports, strict=True):
                while proc.poll() is None and time.monotonic() < deadline:
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            if resp.status != 200:
                                break
                    except (aiohttp.ClientError, OSError):
                        break
                    await asyncio.sleep(0.02)  # poll interval while the signal is handled

    def cpu_seconds(self) -> float | None:
        values = [proc_cpu_seconds(p.pid) for p in self.procs]
        return None if any(v is None for v in values) else sum(v or 0.0 for v in values)

    def memory(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for p in self.procs:
            for key, value in proc_memory_bytes(p.pid).items():
                total[key] = total.get(key, 0) + value
        return total

    def terminate(self) -> None:
        """SIGTERM each process once: a second SIGTERM makes the dispatcher exit at once."""
        for p in self.procs:
            if p.poll() is None and p.pid not in self._terminated:
                p.send_signal(signal.SIGTERM)
                self._terminated.add(p.pid)

    async def stop(self) -> None:
        self.terminate()
        deadline = time.monotonic() + 15
        for p in self.procs:
            while p.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 (a process, not an event)
                await asyncio.sleep(0.05)  # poll interval while the process drains
            if p.poll() is None:
                p.kill()
                p.wait(5)
        self.procs.clear()
        self.ports.clear()


# -- child processes: the ceiling client and the naive loop ------------------------------------


def _run_loop(coro: Any, *, uvloop_ok: bool) -> None:
    if uvloop_ok:
        try:
            import uvloop  # noqa: PLC0415

            uvloop.run(coro)
            return
        except ImportError:
            pass
    asyncio.run(coro)


def _static_headers(body: bytes) -> dict[str, str]:
    ts = int(time.time())
    item = signing.SigningInput("evt_ceiling", ts, body, (SECRET,), SIGNATURE_HEADER)
    mac = hmac.new(signing.secret_key_bytes(SECRET), f"evt_ceiling.{ts}.".encode() + body, "sha256")
    return {
        "content-type": "application/json",
        "webhook-id": item.msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
    }


async def _ceiling(url: str, total: int, concurrency: int, body: bytes) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    headers = _static_headers(body)
    remaining = [total]
    async with aiohttp.ClientSession(
        connector=connector, skip_auto_headers=("Accept-Encoding",)
    ) as session:

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def ceiling_child(url: str, total: int, concurrency: int, body: bytes) -> None:
    _run_loop(_ceiling(url, total, concurrency, body), uvloop_ok=True)


_NAIVE_CLAIM = """
-- The naive baseline: lock 100 pending rows (SKIP LOCKED), mark them taken, return what a
-- request needs. No per-subscription caps, no ordering, no fencing, no attempt log.
-- Rows by primary key (ANY(ARRAY(...))): a join on the locking subquery gets a sequential
-- scan from the planner, and the baseline should be naive in its loop, not in its plan.
UPDATE webhook_deliveries d
SET state = 'in_flight', attempt = d.attempt + 1, leased_until = now() + interval '60 s'
FROM webhook_outbox o, webhook_subscriptions s
WHERE d.id = ANY (ARRAY(SELECT id FROM webhook_deliveries WHERE state = 'pending'
                        LIMIT $1 FOR UPDATE SKIP LOCKED))
  AND o.id = d.outbox_id AND s.id = d.subscription_id
RETURNING d.id, o.event_id, o.payload::text AS body, s.url, s.secret
"""
_NAIVE_DONE = """
UPDATE webhook_deliveries SET state = 'delivered', leased_until = NULL, finished_at = now(),
       updated_at = now()
WHERE id = ANY($1::bigint[])
"""


async def _naive(dsn: str, deadline_seconds: float) -> None:
    conn = await asyncpg.connect(dsn)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=NAIVE_BATCH))
    deadline = time.monotonic() + deadline_seconds
    try:

        async def post(row: Any) -> int | None:
            body = row["body"].encode()
            ts = str(int(time.time()))
            key = signing.secret_key_bytes(row["secret"])
            mac = hmac.new(key, f"{row['event_id']}.{ts}.".encode() + body, hashlib.sha256)
            headers = {
                "content-type": "application/json",
                "webhook-id": row["event_id"],
                "webhook-timestamp": ts,
                "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
            }
            try:
                async with session.post(row["url"], data=body, headers=headers) as resp:
                    await resp.read()
                    return row["id"] if 200 <= resp.status < 300 else None
            except aiohttp.ClientError:
                return None

        while time.monotonic() < deadline:
            rows = await conn.fetch(_NAIVE_CLAIM, NAIVE_BATCH)
            if not rows:
                return
            done = await asyncio.gather(*(post(r) for r in rows))
            await conn.execute(_NAIVE_DONE, [i for i in done if i is not None])
    finally:
        await session.close()
        await conn.close()


def naive_child(dsn: str, deadline_seconds: float) -> None:
    # The default event loop on purpose: this is the loop the baseline figure used.
    _run_loop(_naive(dsn, deadline_seconds), uvloop_ok=False)


class Child:
    """A spawned helper process, measured from outside like the dispatcher."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._proc = ctx.Process(target=target, args=args, daemon=True)

    def start(self) -> None:
        self._proc.start()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.is_alive()

    async def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._proc.is_alive() and time.monotonic() < deadline:  # noqa: ASYNC110 (a process)
            await asyncio.sleep(0.05)  # poll interval while the child finishes
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(5)


# -- the bench database ------------------------------------------------------------------------


_RESET = """
TRUNCATE webhook_attempts, webhook_deliveries, webhook_outbox, webhook_subscriptions,
         webhook_delivery_count_deltas CASCADE
"""
_SUBSCRIBE = """
INSERT INTO webhook_subscriptions (url, event_types, secret, signature_header, max_in_flight)
VALUES ($1, $2, $3, $4, $5)
RETURNING id
"""
_SEED = """
-- Bench only: pre-routed events and one pending delivery each, round-robin over $5.
WITH ev AS (
    INSERT INTO webhook_outbox (event_id, event_type, payload, routed_at, route_result,
                                delivery_count)
    SELECT $1 || g, 'bench.event', jsonb_build_object('i', g, 'pad', $2::text), now(),
           'routed', 1
    FROM generate_series($3::bigint, $4::bigint) g
    RETURNING id, created_at
)
INSERT INTO webhook_deliveries (outbox_id, subscription_id, event_created_at)
SELECT ev.id, ($5::uuid[])[1 + (ev.id % cardinality($5::uuid[]))], ev.created_at
FROM ev
"""
_UNFINISHED = """
SELECT count(*) FROM webhook_deliveries
WHERE state IN ('pending', 'in_flight', 'retrying') AND subscription_id = ANY($1::uuid[])
"""


class BenchDb:
    def __init__(self, server_dsn: str, say: Progress) -> None:
        self.name = f"dispatcher_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.server_dsn = server_dsn
        self.dsn = with_database(server_dsn, self.name)
        self.conn: Any = None
        self._say = say

    async def create(self) -> None:
        from dispatcher import app  # noqa: PLC0415 (app pulls in the whole dispatcher)

        admin = await asyncpg.connect(self.server_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await admin.close()
        await app.migrate_database(self.dsn)
        self.conn = await asyncpg.connect(self.dsn)
        self.server_version = str(await self.conn.fetchval("SHOW server_version"))

    async def drop(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        admin = await asyncpg.connect(self.server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await admin.close()

    async def reset(self) -> None:
        await self.conn.execute(_RESET)

    async def subscribe(
        self, url: str, event_types: Sequence[str] = ("bench.*",), max_in_flight: int = 100
    ) -> uuid.UUID:
        sub: uuid.UUID = await self.conn.fetchval(
            _SUBSCRIBE, url, list(event_types), SECRET, SIGNATURE_HEADER, max_in_flight
        )
        return sub

    async def seed(self, subs: Sequence[uuid.UUID], n: int, payload_bytes: int) -> float:
        """Insert n routed events with a pending delivery each; returns seconds taken."""
        started = time.monotonic()
        chunk = 100_000
        prefix = f"evt_{uuid.uuid4().hex[:8]}_"
        for lo in range(1, n + 1, chunk):
            hi = min(n, lo + chunk - 1)
            await self.conn.execute(_SEED, prefix, payload_pad(payload_bytes), lo, hi, list(subs))
            if n > chunk:
                self._say(f"  seeded {hi:,}/{n:,} pending deliveries")
        await self.conn.execute("ANALYZE webhook_outbox")
        await self.conn.execute("ANALYZE webhook_deliveries")
        # What routing does after creating deliveries: running dispatchers claim at once.
        await self.conn.execute("SELECT pg_notify('dispatcher_work', '')")
        return time.monotonic() - started

    async def backend_pids(self) -> list[int]:
        """Server processes serving this database (only measurable when the server is local)."""
        rows = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.name
        )
        return [int(r["pid"]) for r in rows]

    async def unfinished(self, subs: Sequence[uuid.UUID]) -> int:
        return int(await self.conn.fetchval(_UNFINISHED, list(subs)))


# -- measuring a drain -------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Drain:
    count: int
    seconds: float
    rate: float
    complete: bool
    ack_lag_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "deliveries": self.count,
            "seconds": round(self.seconds, 3),
            "rate_per_second": round(self.rate, 1),
            "complete": self.complete,
            "ack_lag_ms": None if self.ack_lag_ms is None else round(self.ack_lag_ms, 1),
        }


async def watch(
    receiver: ReceiverProcess,
    tag: str,
    expected: int,
    *,
    timeout: float,
    say: Progress,
    label: str,
    db: BenchDb | None = None,
    subs: Sequence[uuid.UUID] = (),
    alive: Callable[[], bool] | None = None,
) -> Drain:
    """Wait until the receiver saw ``expected`` requests under ``tag`` (or the timeout), then,
    with ``db``, until those deliveries are acknowledged. The rate is arrivals over the window
    from first to last arrival, so process start-up is not counted."""
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    stats = await receiver.tag(tag)
    while stats["count"] < expected and time.monotonic() < deadline:
        if alive is not None and not alive() and stats["count"] == 0:
            break
        await asyncio.sleep(0.1)  # progress poll; the measurement uses receiver timestamps
        stats = await receiver.tag(tag)
        if time.monotonic() - last_report >= 2.0:
            last_report = time.monotonic()
            window = max(1e-9, stats["last"] - stats["first"])
            say(f"  {label}: {stats['count']:,}/{expected:,} ({stats['count'] / window:,.0f}/s)")
    count = int(stats["count"])
    window = stats["last"] - stats["first"]
    rate = (count - 1) / window if count > 1 and window > 0 else 0.0
    lag = None
    if db is not None and count >= expected:
        while time.monotonic() < deadline and await db.unfinished(subs):  # noqa: ASYNC110 (the database)
            await asyncio.sleep(0.01)  # poll interval for the acknowledgements
        lag = max(0.0, (time.time() - stats["last"]) * 1000)
    return Drain(count, window, rate, count >= expected, lag)


# -- scenarios ---------------------------------------------------------------------------------


class Bench:
    def __init__(
        self,
        options: Options,
        db: BenchDb,
        receiver: ReceiverProcess,
        env: Any,
        say: Progress,
    ):
        self.o = options
        self.db = db
        self.receiver = receiver
        self.env = env
        self.say = say
        self.log_dir = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
        self.body = orjson.dumps({"i": 0, "pad": payload_pad(options.payload_bytes)})
        self._retiring: list[Fleet] = []

    def fleet(self, **settings: str) -> Fleet:
        base = {"DISPATCHER_MAX_IN_FLIGHT": str(self.o.concurrency)}
        extra = dict(self.o.dispatcher_env)
        return Fleet(self.db.dsn, self.env, self.log_dir, {**base, **settings, **extra})

    async def retire(self, fleet: Fleet) -> None:
        """Stop a scenario's dispatchers. A quick run waits only until they stop claiming
        (readiness off: draining) and reaps them in ``close``: each exit takes most of a
        second. What they still finish cannot touch the next scenario: its TRUNCATE waits for
        their open statements, and their acknowledgements skip rows that are gone. The full
        run always waits for the exit, so no shutdown overlaps a measurement."""
        if self.o.quick:
            fleet.terminate()
            self._retiring.append(fleet)
            await fleet.wait_draining()
        else:
            await fleet.stop()

    async def close(self) -> None:
        """Reap the dispatchers ``retire`` only signalled."""
        for fleet in self._retiring:
            await fleet.stop()
        self._retiring.clear()

    async def _subs(self, kind: str, tag: str, n: int) -> list[uuid.UUID]:
        return [
            await self.db.subscribe(
                self.receiver.url(kind, tag, i), max_in_flight=self.o.concurrency
            )
            for i in range(n)
        ]

    # 1
    async def ceiling(self) -> dict[str, Any]:
        o = self.o
        child = Child(
            ceiling_child, self.receiver.url("ok", "ceiling"), o.events, o.concurrency, self.body
        )
        child.start()
        cpu0 = proc_cpu_seconds(child.pid)
        drain = await watch(
            self.receiver,
            "ceiling",
            o.events,
            timeout=o.scenario_timeout_seconds,
            say=self.say,
            label="ceiling",
            alive=child.alive,
        )
        cpu1 = proc_cpu_seconds(child.pid)
        await child.join(10)
        out = {"concurrency": o.concurrency, **drain.as_dict()}
        out["client_cpu_us_per_request"] = _per(cpu0, cpu1, drain.count)
        return out

    # 2
    async def baseline(self) -> dict[str, Any]:
        o = self.o
        await self.db.reset()
        subs = await self._subs("ok", "baseline", o.subscriptions)
        await self.db.seed(subs, o.events, o.payload_bytes)
        child = Child(naive_child, self.db.dsn, o.scenario_timeout_seconds)
        child.start()
        cpu0 = proc_cpu_seconds(child.pid)
        await self._first_arrival("baseline")
        db_cpu = DbCpu(self.db)
        await db_cpu.start()
        drain = await watch(
            self.receiver,
            "baseline",
            o.events,
            timeout=o.scenario_timeout_seconds,
            say=self.say,
            label="baseline",
            db=self.db,
            subs=subs,
            alive=child.alive,
        )
        cpu1 = proc_cpu_seconds(child.pid)
        db_seconds = db_cpu.stop()
        await child.join(10)
        out = {"batch": NAIVE_BATCH, "event_loop": "asyncio", **drain.as_dict()}
        out["cpu_us_per_delivery"] = _per(cpu0, cpu1, drain.count)
        out["db_cpu_us_per_delivery"] = _per(0.0, db_seconds, drain.count)
        return out

    # 3 (and the scaling comparison)
    async def throughput(self, processes: int = 1, tag: str = "throughput") -> dict[str, Any]:
        o = self.o
        await self.db.reset()
        subs = await self._subs("ok", tag, o.subscriptions)
        if not o.quick:
            await self.db.seed(subs, o.events, o.payload_bytes)
        fleet = self.fleet()
        fleet.start(processes, tag)
        try:
            await fleet.wait_ready()
            cpu0 = fleet.cpu_seconds()
            if o.quick:
                # A quick run's few events would be gone before the last process is ready:
                # seeded once all are, so every process (and its CPU) is in the figure.
                await self.db.seed(subs, o.events, o.payload_bytes)
            db_cpu = DbCpu(self.db)
            await db_cpu.start()
            drain = await watch(
                self.receiver,
                tag,
                o.events,
                timeout=o.scenario_timeout_seconds,
                say=self.say,
                label=f"{tag} ({processes} process{'es' if processes > 1 else ''})",
                db=self.db,
                subs=subs,
            )
            cpu1 = fleet.cpu_seconds()
            db_seconds = db_cpu.stop()
        finally:
            await self.retire(fleet)
        return {
            "processes": processes,
            "subscriptions": o.subscriptions,
            "max_in_flight_per_process": o.concurrency,
            **drain.as_dict(),
            "cpu_us_per_delivery": _per(cpu0, cpu1, drain.count),
            "db_cpu_us_per_delivery": _per(0.0, db_seconds, drain.count),
        }

    # 4
    async def latency(self) -> dict[str, Any]:
        o = self.o
        await self.db.reset()
        await self.db.subscribe(
            self.receiver.url("lat", "latency"), event_types=["bench.latency"], max_in_flight=50
        )
        fleet = self.fleet()
        fleet.start(1, "latency")
        warmup = 10 if o.quick else 50
        measured = max(1, int(o.latency_rate * o.latency_seconds))
        pad = payload_pad(o.payload_bytes)
        try:
            await fleet.wait_ready()
            interval = 1.0 / o.latency_rate
            started = time.monotonic()
            for i in range(warmup + measured):
                due = started + i * interval
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the offered rate
                payload: dict[str, Any] = {"pad": pad}
                if i >= warmup:  # the first requests open connections; not counted
                    payload = {"bench_t": time.time(), "pad": pad}
                await self.db.conn.execute(
                    "INSERT INTO webhook_outbox (event_type, payload) VALUES ($1, $2::jsonb)",
                    "bench.latency",
                    orjson.dumps(payload).decode(),
                )
            offered = (warmup + measured) / (time.monotonic() - started)
            stats = await self.receiver.tag("latency")
            deadline = time.monotonic() + 30
            while stats["count"] < warmup + measured and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # poll until the last events arrive
                stats = await self.receiver.tag("latency")
        finally:
            await self.retire(fleet)
        ms = [v * 1000 for v in stats["latencies"]]
        return {
            "offered_per_second": round(offered, 1),
            "samples": len(ms),
            "p50_ms": round(percentile(ms, 50), 2),
            "p95_ms": round(percentile(ms, 95), 2),
            "p99_ms": round(percentile(ms, 99), 2),
            "max_ms": round(max(ms), 2) if ms else 0.0,
            "complete": len(ms) >= measured,
        }

    # 5
    async def backlog(self) -> dict[str, Any]:
        o = self.o
        window = min(o.backlog_small, o.backlog_large)
        out: dict[str, Any] = {"window": window}
        for label, size in (("small", o.backlog_small), ("large", o.backlog_large)):
            await self.db.reset()
            tag = f"backlog_{label}"
            subs = await self._subs("ok", tag, o.subscriptions)
            self.say(f"  backlog: seeding {size:,} pending deliveries")
            seeded = await self.db.seed(subs, size, o.payload_bytes)
            fleet = self.fleet()
            fleet.start(1, tag)
            try:
                await fleet.wait_ready()
                drain = await watch(
                    self.receiver,
                    tag,
                    window,
                    timeout=o.scenario_timeout_seconds,
                    say=self.say,
                    label=f"backlog {size:,}",
                )
            finally:
                await self.retire(fleet)
            out[label] = {"pending": size, "seed_seconds": round(seeded, 1), **drain.as_dict()}
        await self.db.reset()
        return out

    # 6
    async def isolation(self) -> dict[str, Any]:
        o = self.o
        out: dict[str, Any] = {"request_timeout_seconds": o.request_timeout_seconds}
        settings = {"DISPATCHER_REQUEST_TIMEOUT": str(o.request_timeout_seconds)}
        settings["DISPATCHER_CONNECT_TIMEOUT"] = str(min(1.0, o.request_timeout_seconds))
        for label in ("without", "with"):
            await self.db.reset()
            tag = f"iso_{label}"
            subs = await self._subs("ok", tag, o.subscriptions)
            await self.db.seed(subs, o.isolation_events, o.payload_bytes)
            if label == "with":
                hole = await self.db.subscribe(
                    self.receiver.url("hole", "iso_hole"), max_in_flight=10
                )
                await self.db.seed([hole], 1_000, o.payload_bytes)
            fleet = self.fleet(**settings)
            fleet.start(1, tag)
            try:
                await fleet.wait_ready()
                drain = await watch(
                    self.receiver,
                    tag,
                    o.isolation_events,
                    timeout=o.scenario_timeout_seconds,
                    say=self.say,
                    label=f"isolation ({label} blackhole)",
                )
            finally:
                await self.retire(fleet)
            out[label] = drain.as_dict()
        out["blackholed_requests"] = (await self.receiver.tag("iso_hole"))["count"]
        return out

    # 7
    async def footprint(self) -> dict[str, Any]:
        """Idle first (subscriptions, no work), then the same process with a backlog seeded
        under it: peak RSS while it is pending, CPU per delivery over a bounded drain."""
        o = self.o
        await self.db.reset()
        subs = await self._subs("ok", "footprint", o.subscriptions)
        fleet = self.fleet()
        fleet.start(1, "footprint")
        peak_rss = 0
        try:
            await fleet.wait_ready()
            rss_at_start = fleet.memory().get("VmRSS", 0)
            self.say(f"  footprint: idle for {o.idle_seconds:g}s")
            await asyncio.sleep(0.3 if o.quick else 2.0)  # start-up work (first gauges) ends
            idle0 = fleet.cpu_seconds()
            await asyncio.sleep(o.idle_seconds)  # the idle window being measured
            idle1 = fleet.cpu_seconds()
            rss_idle = fleet.memory().get("VmRSS", 0)
            self.say(f"  footprint: seeding {o.footprint_pending:,} pending under it")
            await self.db.seed(subs, o.footprint_pending, o.payload_bytes)
            cpu0 = fleet.cpu_seconds()
            sampler = asyncio.create_task(self._sample_rss(fleet))
            try:
                drain = await watch(
                    self.receiver,
                    "footprint",
                    o.footprint_pending,
                    timeout=o.footprint_seconds,
                    say=self.say,
                    label="footprint drain",
                )
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    peak_rss = await sampler
            cpu1 = fleet.cpu_seconds()
            peak_rss = max(peak_rss, fleet.memory().get("VmHWM", 0))
        finally:
            await self.retire(fleet)
        idle = None if idle0 is None or idle1 is None else (idle1 - idle0) / o.idle_seconds * 100
        return {
            "pending": o.footprint_pending,
            "deliveries": drain.count,
            "drain_seconds": round(drain.seconds, 1),
            "drain_rate_per_second": round(drain.rate, 1),
            "cpu_us_per_delivery": _per(cpu0, cpu1, drain.count),
            "rss_mb_at_start": round(rss_at_start / 2**20, 1),
            "rss_mb_idle": round(rss_idle / 2**20, 1),
            "rss_mb_peak_with_pending": round(peak_rss / 2**20, 1),
            "idle_seconds": o.idle_seconds,
            "idle_cpu_percent_of_core": None if idle is None else round(idle, 3),
        }

    async def _first_arrival(self, tag: str, timeout: float = 30.0) -> None:
        """Wait for the first request of ``tag``: the child has connected and is running."""
        deadline = time.monotonic() + timeout
        while (await self.receiver.tag(tag))["count"] == 0 and time.monotonic() < deadline:  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.02)  # poll interval while the child starts

    @staticmethod
    async def _sample_rss(fleet: Fleet) -> int:
        peak = 0
        try:
            while True:
                peak = max(peak, fleet.memory().get("VmRSS", 0))
                await asyncio.sleep(0.2)  # sampling interval
        except asyncio.CancelledError:
            return peak


class DbCpu:
    """On-CPU time of the Postgres backends serving the bench database, between start() and
    stop(); None when the server is not on this host (its /proc is not ours to read).
    Sampled every 0.1 s, so a backend whose client disconnects before stop() still counts."""

    def __init__(self, db: BenchDb) -> None:
        self._db = db
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._start = {}
        for pid in await self._db.backend_pids():
            cpu = proc_cpu_seconds(pid)
            if cpu is not None:
                self._start[pid] = self._last[pid] = cpu
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(0.1)  # sampling interval
            self._read()

    def _read(self) -> None:
        for pid in self._start:
            cpu = proc_cpu_seconds(pid)
            if cpu is not None:
                self._last[pid] = cpu

    def stop(self) -> float | None:
        if self._task is not None:
            self._task.cancel()
        if not self._start:
            return None
        self._read()
        return sum(self._last[pid] - before for pid, before in self._start.items())


def _per(cpu0: float | None, cpu1: float | None, n: int) -> float | None:
    if cpu0 is None or cpu1 is None or n <= 0:
        return None
    return round((cpu1 - cpu0) / n * 1e6, 1)


# -- report ------------------------------------------------------------------------------------

TARGETS: tuple[tuple[str, str, float, Callable[[dict[str, Any]], float | None]], ...] = (
    ("throughput / baseline", ">=", 1.5, lambda r: r["ratios"].get("throughput_vs_baseline")),
    ("throughput / ceiling", ">=", 0.6, lambda r: r["ratios"].get("throughput_vs_ceiling")),
    ("latency p50 ms", "<=", 5.0, lambda r: _get(r, "latency", "p50_ms")),
    ("latency p99 ms", "<=", 25.0, lambda r: _get(r, "latency", "p99_ms")),
    ("backlog large / small", ">=", 0.8, lambda r: r["ratios"].get("backlog_large_vs_small")),
    ("isolation", ">=", 0.9, lambda r: r["ratios"].get("isolation")),
    ("idle CPU % of a core", "<=", 1.0, lambda r: _get(r, "footprint", "idle_cpu_percent_of_core")),
    (
        "RSS MB with pending",
        "<=",
        150.0,
        lambda r: _get(r, "footprint", "rss_mb_peak_with_pending"),
    ),
    ("CPU µs per delivery", "<=", 300.0, lambda r: _get(r, "footprint", "cpu_us_per_delivery")),
)


def _get(report: dict[str, Any], section: str, key: str) -> float | None:
    value = report.get(section, {}).get(key)
    return None if value is None else float(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 3)


def ratios(report: dict[str, Any]) -> dict[str, float | None]:
    def rate(*path: str) -> float | None:
        node: Any = report
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return float(node)

    tp = rate("throughput", "rate_per_second")
    out = {
        "throughput_vs_baseline": _ratio(tp, rate("baseline", "rate_per_second")),
        "throughput_vs_ceiling": _ratio(tp, rate("ceiling", "rate_per_second")),
        "backlog_large_vs_small": _ratio(
            rate("backlog", "large", "rate_per_second"), rate("backlog", "small", "rate_per_second")
        ),
        "isolation": _ratio(
            rate("isolation", "with", "rate_per_second"),
            rate("isolation", "without", "rate_per_second"),
        ),
        "scaling_n_vs_1": _ratio(rate("scaling", "rate_per_second"), tp),
    }
    return {k: v for k, v in out.items() if v is not None}


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, op, bound, get in TARGETS:
        value = get(report)
        if value is None:
            continue
        met = value >= bound if op == ">=" else value <= bound
        out.append({"target": name, "bound": f"{op} {bound:g}", "value": value, "met": met})
    return out


def render(report: dict[str, Any]) -> str:
    lines = [
        f"dispatcher bench {report['version']} — {report['machine']['cpus']} CPUs, "
        f"Postgres {report['machine']['postgres']}, receiver: {report['machine']['receiver']}",
        "",
        f"{'scenario':<12} result",
    ]

    def add(name: str, text: str) -> None:
        lines.append(f"{name:<12} {text}")

    r = report
    if "ceiling" in r:
        c = r["ceiling"]
        add(
            "ceiling",
            f"{c['rate_per_second']:>9,.0f} req/s   raw aiohttp POSTs, {c['concurrency']} "
            f"concurrent, {c['deliveries']:,} requests, "
            f"{c['client_cpu_us_per_request']} µs client CPU/request",
        )
    if "baseline" in r:
        b = r["baseline"]
        add(
            "baseline",
            f"{b['rate_per_second']:>9,.0f} /s      naive claim {b['batch']} → sign → gather → "
            f"mark done, {b['deliveries']:,} deliveries",
        )
    if "throughput" in r:
        t = r["throughput"]
        add(
            "throughput",
            f"{t['rate_per_second']:>9,.0f} /s      dispatcher, 1 process, {t['deliveries']:,} "
            f"deliveries over {t['subscriptions']} subscriptions, "
            f"{t['cpu_us_per_delivery']} µs CPU/delivery",
        )
    if "scaling" in r:
        s = r["scaling"]
        add(
            "scaling",
            f"{s['rate_per_second']:>9,.0f} /s      dispatcher, {s['processes']} processes, "
            f"{s['cpu_us_per_delivery']} µs CPU/delivery",
        )
    if "latency" in r:
        lat = r["latency"]
        add(
            "latency",
            f"p50 {lat['p50_ms']} ms · p95 {lat['p95_ms']} ms · p99 {lat['p99_ms']} ms at "
            f"{lat['offered_per_second']:.0f} events/s ({lat['samples']} samples)",
        )
    if "backlog" in r:
        bl = r["backlog"]
        for key in ("small", "large"):
            x = bl[key]
            add(
                f"backlog {key}",
                f"{x['rate_per_second']:>9,.0f} /s      with {x['pending']:,} pending "
                f"(first {bl['window']:,} drained; seeded in {x['seed_seconds']} s)",
            )
    if "isolation" in r:
        iso = r["isolation"]
        add(
            "isolation",
            f"{iso['without']['rate_per_second']:,.0f} /s healthy alone → "
            f"{iso['with']['rate_per_second']:,.0f} /s beside a blackholed subscription "
            f"({iso['blackholed_requests']} requests held to the "
            f"{iso['request_timeout_seconds']} s timeout)",
        )
    if "footprint" in r:
        f = r["footprint"]
        add(
            "footprint",
            f"idle {f['idle_cpu_percent_of_core']} % of a core · peak RSS "
            f"{f['rss_mb_peak_with_pending']} MB with {f['pending']:,} pending · "
            f"{f['cpu_us_per_delivery']} µs CPU/delivery",
        )
    lines += ["", "ratios (compare these across machines)"]
    for key, value in r["ratios"].items():
        lines.append(f"  {key:<26} {value:.3f}")
    lines += ["", "targets"]
    for t in r["targets"]:
        lines.append(
            f"  {t['target']:<26} {t['value']:>10.3f}  {t['bound']:<8} "
            f"{'met' if t['met'] else 'MISSED'}"
        )
    return "\n".join(lines)


# -- entry point -------------------------------------------------------------------------------


async def run(options: Options, server_dsn: str, *, env: Mapping[str, str]) -> int:
    say = Progress()
    unknown = set(options.scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios: {', '.join(sorted(unknown))}")
    db = BenchDb(server_dsn, say)
    receiver = ReceiverProcess(env)
    say(f"creating database {db.name}")
    await db.create()
    report: dict[str, Any] = {"version": __version__}
    bench: Bench | None = None
    try:
        receiver.start()
        say(f"receiver on 127.0.0.1:{receiver.port} (pid {receiver.pid})")
        bench = Bench(options, db, receiver, env, say)
        report["machine"] = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": db.server_version,
            "receiver": "raw asyncio protocol (dispatcher.bench_receiver), own process",
        }
        report["options"] = dataclasses.asdict(options)
        steps: dict[str, Callable[[], Any]] = {
            "ceiling": bench.ceiling,
            "baseline": bench.baseline,
            "throughput": bench.throughput,
            "scaling": lambda: bench.throughput(options.processes, "scaling"),
            "latency": bench.latency,
            "isolation": bench.isolation,
            "backlog": bench.backlog,
            "footprint": bench.footprint,
        }
        for name in SCENARIOS:
            if name not in options.scenarios:
                continue
            say(f"{name} …")
            report[name] = await steps[name]()
            say(f"{name}: {_summary(report[name])}")
    finally:
        if bench is not None:
            await bench.close()
        await receiver.stop()
        say(f"dropping database {db.name}")
        await db.drop()
    report["ratios"] = ratios(report)
    report["targets"] = targets(report)
    if options.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render(report) + "\n")
    sys.stdout.flush()
    return 0


def _summary(section: dict[str, Any]) -> str:
    keys = (
        "rate_per_second",
        "p50_ms",
        "p99_ms",
        "cpu_us_per_delivery",
        "idle_cpu_percent_of_core",
    )
    parts = [f"{k}={section[k]}" for k in keys if k in section]
    for sub in ("small", "large", "without", "with"):
        if sub in section:
            parts.append(f"{sub}={section[sub]['rate_per_second']}/s")
    return ", ".join(parts)


def add_arguments(p: Any) -> None:
    """``dispatcher bench`` options (the CLI owns the parser; the defaults live here)."""
    d = Options()
    p.add_argument("--quick", action="store_true", help="smoke run: a few seconds per scenario")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only these scenarios (repeatable; default all)",
    )
    p.add_argument("--processes", type=int, help=f"scaling: dispatcher processes ({d.processes})")
    p.add_argument("--events", type=int, help=f"deliveries per throughput run ({d.events:,})")
    p.add_argument("--concurrency", type=int, help=f"requests in flight ({d.concurrency})")
    p.add_argument("--subscriptions", type=int, help=f"subscriptions ({d.subscriptions})")
    p.add_argument("--payload-bytes", type=int, help=f"event payload size ({d.payload_bytes})")
    p.add_argument("--latency-rate", type=float, help=f"events/s offered ({d.latency_rate:g})")
    p.add_argument("--latency-seconds", type=float, help=f"({d.latency_seconds:g})")
    p.add_argument("--backlog-small", type=int, help=f"pending rows ({d.backlog_small:,})")
    p.add_argument("--backlog-large", type=int, help=f"pending rows ({d.backlog_large:,})")
    p.add_argument("--footprint-pending", type=int, help=f"({d.footprint_pending:,})")
    p.add_argument("--isolation-events", type=int, help=f"({d.isolation_events:,})")
    p.add_argument(
        "--request-timeout",
        type=float,
        help=f"isolation: how long a blackholed request holds ({d.request_timeout_seconds:g} s)",
    )
    p.add_argument("--idle-seconds", type=float, help=f"idle CPU window ({d.idle_seconds:g})")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a DISPATCHER_* setting for the dispatcher under test (repeatable)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help=f"bound per scenario, seconds ({d.scenario_timeout_seconds:g})",
    )


def options_from_args(args: Any) -> Options:
    changes: dict[str, Any] = {"json": bool(args.json)}
    for arg, field in (
        ("processes", "processes"),
        ("events", "events"),
        ("concurrency", "concurrency"),
        ("subscriptions", "subscriptions"),
        ("payload_bytes", "payload_bytes"),
        ("latency_rate", "latency_rate"),
        ("latency_seconds", "latency_seconds"),
        ("backlog_small", "backlog_small"),
        ("backlog_large", "backlog_large"),
        ("footprint_pending", "footprint_pending"),
        ("isolation_events", "isolation_events"),
        ("request_timeout", "request_timeout_seconds"),
        ("idle_seconds", "idle_seconds"),
        ("timeout", "scenario_timeout_seconds"),
    ):
        value = getattr(args, arg, None)
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{arg.replace('_', '-')} must be > 0")
            changes[field] = value
    if args.scenario:
        changes["scenarios"] = tuple(args.scenario)
    pairs = []
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("DISPATCHER_"):
            raise ValueError(f"--set {item!r}: expected DISPATCHER_NAME=VALUE")
        pairs.append((name, value))
    changes["dispatcher_env"] = tuple(pairs)
    return Options.quick_run(**changes) if args.quick else dataclasses.replace(Options(), **changes)
