"""What must not degrade: a large backlog, a blackholed neighbour (isolation), and the
footprint (idle CPU, RSS with a pending backlog, CPU per delivery).

Each function returns its section of the report.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from dispatcher.bench import core, measure


async def backlog(b: core.Bench) -> dict[str, Any]:
    o = b.o
    window = min(o.backlog_small, o.backlog_large)
    out: dict[str, Any] = {"window": window}
    for label, size in (("small", o.backlog_small), ("large", o.backlog_large)):
        await b.db.reset()
        tag = f"backlog_{label}"
        subs = await b.subs("ok", tag, o.subscriptions)
        b.say(f"  backlog: seeding {size:,} pending deliveries")
        seeded = await b.db.seed(subs, size, o.payload_bytes)
        fleet = b.fleet()
        fleet.start(1, tag)
        try:
            await fleet.wait_ready()
            drain = await measure.watch(
                b.receiver,
                tag,
                window,
                timeout=o.scenario_timeout_seconds,
                say=b.say,
                label=f"backlog {size:,}",
            )
        finally:
            await b.retire(fleet)
        out[label] = {"pending": size, "seed_seconds": round(seeded, 1), **drain.as_dict()}
    await b.db.reset()
    return out


async def isolation(b: core.Bench) -> dict[str, Any]:
    o = b.o
    out: dict[str, Any] = {"request_timeout_seconds": o.request_timeout_seconds}
    settings = {"DISPATCHER_REQUEST_TIMEOUT": str(o.request_timeout_seconds)}
    settings["DISPATCHER_CONNECT_TIMEOUT"] = str(min(1.0, o.request_timeout_seconds))
    for label in ("without", "with"):
        await b.db.reset()
        tag = f"iso_{label}"
        subs = await b.subs("ok", tag, o.subscriptions)
        await b.db.seed(subs, o.isolation_events, o.payload_bytes)
        if label == "with":
            hole = await b.db.subscribe(b.receiver.url("hole", "iso_hole"), max_in_flight=10)
            await b.db.seed([hole], 1_000, o.payload_bytes)
        fleet = b.fleet(**settings)
        fleet.start(1, tag)
        try:
            await fleet.wait_ready()
            drain = await measure.watch(
                b.receiver,
                tag,
                o.isolation_events,
                timeout=o.scenario_timeout_seconds,
                say=b.say,
                label=f"isolation ({label} blackhole)",
            )
        finally:
            await b.retire(fleet)
        out[label] = drain.as_dict()
    out["blackholed_requests"] = (await b.receiver.tag("iso_hole"))["count"]
    return out


async def footprint(b: core.Bench) -> dict[str, Any]:
    """Idle first (subscriptions, no work), then the same process with a backlog seeded
    under it: peak RSS while it is pending, CPU per delivery over a bounded drain."""
    o = b.o
    await b.db.reset()
    subs = await b.subs("ok", "footprint", o.subscriptions)
    fleet = b.fleet()
    fleet.start(1, "footprint")
    peak_rss = 0
    try:
        await fleet.wait_ready()
        rss_at_start = fleet.memory().get("VmRSS", 0)
        b.say(f"  footprint: idle for {o.idle_seconds:g}s")
        await asyncio.sleep(0.3 if o.quick else 2.0)  # start-up work (first gauges) ends
        idle0 = fleet.cpu_seconds()
        await asyncio.sleep(o.idle_seconds)  # the idle window being measured
        idle1 = fleet.cpu_seconds()
        rss_idle = fleet.memory().get("VmRSS", 0)
        b.say(f"  footprint: seeding {o.footprint_pending:,} pending under it")
        await b.db.seed(subs, o.footprint_pending, o.payload_bytes)
        cpu0 = fleet.cpu_seconds()
        sampler = asyncio.create_task(b.sample_rss(fleet))
        try:
            drain = await measure.watch(
                b.receiver,
                "footprint",
                o.footprint_pending,
                timeout=o.footprint_seconds,
                say=b.say,
                label="footprint drain",
            )
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                peak_rss = await sampler
        cpu1 = fleet.cpu_seconds()
        peak_rss = max(peak_rss, fleet.memory().get("VmHWM", 0))
    finally:
        await b.retire(fleet)
    idle = None if idle0 is None or idle1 is None else (idle1 - idle0) / o.idle_seconds * 100
    return {
        "pending": o.footprint_pending,
        "deliveries": drain.count,
        "drain_seconds": round(drain.seconds, 1),
        "drain_rate_per_second": round(drain.rate, 1),
        "cpu_us_per_delivery": measure.per(cpu0, cpu1, drain.count),
        "rss_mb_at_start": round(rss_at_start / 2**20, 1),
        "rss_mb_idle": round(rss_idle / 2**20, 1),
        "rss_mb_peak_with_pending": round(peak_rss / 2**20, 1),
        "idle_seconds": o.idle_seconds,
        "idle_cpu_percent_of_core": None if idle is None else round(idle, 3),
    }
