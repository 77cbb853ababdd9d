"""Throughput scenarios: the ceiling, the naive loop, the dispatcher draining a seeded backlog
(1 or N processes), and the capacity shapes that pit both against each other at equal
concurrency.

Each function returns its section of the report; none changes the dispatcher's settings
beyond what the bench's options say.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from dispatcher.bench import core, measure, naive, options, procs


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """Subscriptions times the per-subscription cap; the process-wide cap is their product, bounded
    by the bench's concurrency (the naive loop's batch is the same number)."""

    name: str
    subscriptions: int
    max_in_flight: int

    def concurrency(self, o: options.Options) -> int:
        return min(o.concurrency, self.subscriptions * self.max_in_flight)


# (a) one capped subscriber, the usual case; (b) is `baseline` + `throughput` (the options'
# subscriptions and concurrency); (c) many small subscribers, events spread evenly.
SHAPES = (Shape("a", 1, 50), Shape("c", 200, 5))


async def ceiling(b: core.Bench) -> dict[str, Any]:
    o = b.o
    child = procs.Child(
        naive.ceiling_child, b.receiver.url("ok", "ceiling"), o.events, o.concurrency, b.body
    )
    child.start()
    cpu0 = measure.proc_cpu_seconds(child.pid)
    drain = await measure.watch(
        b.receiver,
        "ceiling",
        o.events,
        timeout=o.scenario_timeout_seconds,
        say=b.say,
        label="ceiling",
        alive=child.alive,
    )
    cpu1 = measure.proc_cpu_seconds(child.pid)
    await child.join(10)
    out = {"concurrency": o.concurrency, **drain.as_dict()}
    out["client_cpu_us_per_request"] = measure.per(cpu0, cpu1, drain.count)
    return out


async def naive_drain(b: core.Bench, tag: str, subs: list[uuid.UUID], batch: int) -> dict[str, Any]:
    """The naive loop over a freshly seeded backlog for ``subs``."""
    o = b.o
    await b.db.seed(subs, o.events, o.payload_bytes)
    child = procs.Child(naive.naive_child, b.db.dsn, o.scenario_timeout_seconds, batch)
    drained = await b.drain_child(child, tag, tag, db=b.db, subs=subs)
    return {"batch": batch, "event_loop": "asyncio", **drained}


async def baseline(b: core.Bench) -> dict[str, Any]:
    await b.db.reset()
    subs = await b.subs("ok", "baseline", b.o.subscriptions)
    return await naive_drain(b, "baseline", subs, options.NAIVE_BATCH)


async def dispatcher_drain(
    b: core.Bench,
    tag: str,
    subs: list[uuid.UUID],
    *,
    processes: int = 1,
    settings: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``processes`` dispatchers (``--processes`` fleet members) drain a seeded backlog."""
    o = b.o
    if not o.quick:
        await b.db.seed(subs, o.events, o.payload_bytes)
    fleet = b.fleet(**(settings or {}))
    fleet.start(processes, tag)
    try:
        await fleet.wait_ready()
        cpu0 = fleet.cpu_seconds()
        if o.quick:
            # A quick run's few events would be gone before the last process is ready:
            # seeded once all are, so every process (and its CPU) is in the figure.
            await b.db.seed(subs, o.events, o.payload_bytes)
        db_cpu = measure.DbCpu(b.db)
        await db_cpu.start()
        drain = await measure.watch(
            b.receiver,
            tag,
            o.events,
            timeout=o.scenario_timeout_seconds,
            say=b.say,
            label=f"{tag} ({processes} process{'es' if processes > 1 else ''})",
            db=b.db,
            subs=subs,
        )
        cpu1 = fleet.cpu_seconds()
        db_seconds = db_cpu.stop()
    finally:
        await b.retire(fleet)
    return {
        "processes": processes,
        "subscriptions": len(subs),
        **drain.as_dict(),
        "cpu_us_per_delivery": measure.per(cpu0, cpu1, drain.count),
        "db_cpu_us_per_delivery": measure.per(0.0, db_seconds, drain.count),
    }


async def throughput(b: core.Bench, processes: int = 1, tag: str = "throughput") -> dict[str, Any]:
    await b.db.reset()
    subs = await b.subs("ok", tag, b.o.subscriptions)
    out = await dispatcher_drain(b, tag, subs, processes=processes)
    return {**out, "max_in_flight_per_process": b.o.concurrency}


async def shapes(b: core.Bench) -> dict[str, Any]:
    """Each shape drained by the naive loop and by the dispatcher at the same concurrency."""
    out: dict[str, Any] = {}
    for shape in SHAPES:
        concurrency = shape.concurrency(b.o)
        section: dict[str, Any] = {
            "subscriptions": shape.subscriptions,
            "max_in_flight": shape.max_in_flight,
            "concurrency": concurrency,
        }
        for who in ("naive", "dispatcher"):
            await b.db.reset()
            tag = f"shape_{shape.name}_{who}"
            subs = await b.subs("ok", tag, shape.subscriptions, max_in_flight=shape.max_in_flight)
            if who == "naive":
                section[who] = await naive_drain(b, tag, subs, concurrency)
            else:
                settings = {"DISPATCHER_MAX_IN_FLIGHT": str(concurrency)}
                section[who] = await dispatcher_drain(b, tag, subs, settings=settings)
        section["dispatcher_vs_naive"] = measure.ratio(
            section["dispatcher"]["rate_per_second"], section["naive"]["rate_per_second"]
        )
        out[shape.name] = section
        b.say(f"  shape {shape.name}: {section['dispatcher_vs_naive']}x the naive loop")
    return out
