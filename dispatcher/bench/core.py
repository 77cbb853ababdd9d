"""What every scenario shares: the options, the bench database, the receiver, and the
dispatchers under test (started with the bench's settings, retired between scenarios).

Scenario modules take a ``Bench`` and return their section of the report; this module runs
none of them.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from dispatcher.bench import database, measure, options, procs


class Bench:
    def __init__(
        self,
        opts: options.Options,
        db: database.BenchDb,
        receiver: procs.ReceiverProcess,
        env: Any,
        say: measure.Progress,
    ):
        self.o = opts
        self.db = db
        self.receiver = receiver
        self.env = env
        self.say = say
        self.log_dir = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
        self.body = orjson.dumps({"i": 0, "pad": measure.payload_pad(opts.payload_bytes)})
        self._retiring: list[procs.Fleet] = []

    def fleet(self, **settings: str) -> procs.Fleet:
        base = {"DISPATCHER_MAX_IN_FLIGHT": str(self.o.concurrency)}
        extra = dict(self.o.dispatcher_env)
        return procs.Fleet(self.db.dsn, self.env, self.log_dir, {**base, **settings, **extra})

    async def retire(self, fleet: procs.Fleet) -> None:
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

    async def subs(
        self, kind: str, tag: str, n: int, *, max_in_flight: int | None = None
    ) -> list[uuid.UUID]:
        cap = self.o.concurrency if max_in_flight is None else max_in_flight
        return [
            await self.db.subscribe(self.receiver.url(kind, tag, i), max_in_flight=cap)
            for i in range(n)
        ]

    async def first_arrival(self, tag: str, timeout: float = 30.0) -> None:
        """Wait for the first request of ``tag``: the child has connected and is running."""
        deadline = time.monotonic() + timeout
        while (await self.receiver.tag(tag))["count"] == 0 and time.monotonic() < deadline:  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.02)  # poll interval while the child starts

    async def drain_child(
        self, child: procs.Child, tag: str, label: str, **watch: Any
    ) -> dict[str, Any]:
        """Start a helper child and measure its drain of ``tag``: arrivals, its CPU and the
        database's CPU per delivery."""
        child.start()
        cpu0 = measure.proc_cpu_seconds(child.pid)
        await self.first_arrival(tag)
        db_cpu = measure.DbCpu(self.db)
        await db_cpu.start()
        drain = await measure.watch(
            self.receiver,
            tag,
            self.o.events,
            timeout=self.o.scenario_timeout_seconds,
            say=self.say,
            label=label,
            alive=child.alive,
            **watch,
        )
        cpu1 = measure.proc_cpu_seconds(child.pid)
        db_seconds = db_cpu.stop()
        await child.join(10)
        return {
            **drain.as_dict(),
            "cpu_us_per_delivery": measure.per(cpu0, cpu1, drain.count),
            "db_cpu_us_per_delivery": measure.per(0.0, db_seconds, drain.count),
        }

    @staticmethod
    async def sample_rss(fleet: procs.Fleet) -> int:
        peak = 0
        try:
            while True:
                peak = max(peak, fleet.memory().get("VmRSS", 0))
                await asyncio.sleep(0.2)  # sampling interval
        except asyncio.CancelledError:
            return peak
