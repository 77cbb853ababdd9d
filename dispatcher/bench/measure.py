"""Measuring helpers: progress lines, percentiles, per-process CPU and memory from /proc,
database CPU of the bench's backends, and a drain watched through the receiver's counters.

Nothing here starts processes or changes the bench database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class BenchDb(Protocol):
    """What measuring needs of the bench database (``database.BenchDb``); a protocol, so
    this module imports neither the database nor the process modules that import it."""

    async def backend_pids(self) -> list[int]: ...

    async def unfinished(self, subs: Sequence[uuid.UUID]) -> int: ...


class ReceiverProcess(Protocol):
    """What measuring needs of the bench receiver (``procs.ReceiverProcess``)."""

    async def tag(self, name: str) -> dict[str, Any]: ...


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


def per(cpu0: float | None, cpu1: float | None, n: int) -> float | None:
    if cpu0 is None or cpu1 is None or n <= 0:
        return None
    return round((cpu1 - cpu0) / n * 1e6, 1)


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


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 3)
