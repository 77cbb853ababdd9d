"""Latency: insert → arrival at a steady offered rate, measured by the receiver against the
insert time carried in each payload (same host clock).

Returns the report section; does not judge it against targets (report.py does).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from dispatcher.bench import core, measure


async def latency(b: core.Bench) -> dict[str, Any]:
    o = b.o
    await b.db.reset()
    await b.db.subscribe(
        b.receiver.url("lat", "latency"), event_types=["bench.latency"], max_in_flight=50
    )
    fleet = b.fleet()
    fleet.start(1, "latency")
    warmup = 10 if o.quick else 50
    measured = max(1, int(o.latency_rate * o.latency_seconds))
    pad = measure.payload_pad(o.payload_bytes)
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
            await b.db.conn.execute(
                "INSERT INTO webhook_outbox (event_type, payload) VALUES ($1, $2::jsonb)",
                "bench.latency",
                orjson.dumps(payload).decode(),
            )
        offered = (warmup + measured) / (time.monotonic() - started)
        stats = await b.receiver.tag("latency")
        deadline = time.monotonic() + 30
        while stats["count"] < warmup + measured and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # poll until the last events arrive
            stats = await b.receiver.tag("latency")
    finally:
        await b.retire(fleet)
    ms = [v * 1000 for v in stats["latencies"]]
    return {
        "offered_per_second": round(offered, 1),
        "samples": len(ms),
        "p50_ms": round(measure.percentile(ms, 50), 2),
        "p95_ms": round(measure.percentile(ms, 95), 2),
        "p99_ms": round(measure.percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else 0.0,
        "complete": len(ms) >= measured,
    }
