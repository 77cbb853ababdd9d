"""The peer: what a user would assemble instead of the dispatcher — pgqueuer jobs (one
entrypoint per subscription, its concurrency limit the subscription's cap) that sign and POST
with aiohttp, at the same concurrency as the dispatcher in shape (a).

pgqueuer is a development dependency: without it the scenario reports itself skipped. The
peer gets the same receiver, payload and signature as the dispatcher; it keeps no attempt
log, no fencing and no per-subscription ordering.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson

from dispatcher import signing
from dispatcher.bench import core, naive, options, procs, throughput

ENQUEUE_CHUNK = 5_000


async def _peer(dsn: str, urls: list[str], cap: int, deadline_seconds: float) -> None:
    import pgqueuer  # noqa: PLC0415 (dev dependency; only this child needs it)
    from pgqueuer.types import QueueExecutionMode  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    qm = pgqueuer.QueueManager(pgqueuer.Queries(pgqueuer.AsyncpgDriver(conn)))
    total = cap * len(urls)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=total, limit_per_host=0))
    key = signing.secret_key_bytes(options.SECRET)

    def register(name: str, url: str) -> None:
        @qm.entrypoint(name, concurrency_limit=cap)
        async def send(job: pgqueuer.Job) -> None:
            assert job.payload is not None
            event = orjson.loads(job.payload)
            body = event["body"].encode()
            headers = naive.signed_headers(key, event["id"], body)
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                resp.raise_for_status()

    for i, url in enumerate(urls):
        register(f"webhook_{i}", url)
    batch = max(1, total // 2)
    try:
        await qm.run(
            dequeue_timeout=timedelta(seconds=deadline_seconds),
            batch_size=batch,
            max_concurrent_tasks=2 * batch,
            mode=QueueExecutionMode.drain,
        )
    finally:
        await session.close()
        await conn.close()


def peer_child(dsn: str, urls: list[str], cap: int, deadline_seconds: float) -> None:
    procs.run_loop(_peer(dsn, urls, cap, deadline_seconds), uvloop_ok=True)


async def _enqueue(b: core.Bench, n: int, entrypoints: int) -> None:
    import pgqueuer  # noqa: PLC0415

    queries = pgqueuer.Queries(pgqueuer.AsyncpgDriver(b.db.conn))
    if not await queries.schema_is_installed():
        await queries.install()
    body = b.body.decode()
    for lo in range(0, n, ENQUEUE_CHUNK):
        ids = range(lo, min(n, lo + ENQUEUE_CHUNK))
        await queries.enqueue(
            [f"webhook_{i % entrypoints}" for i in ids],
            [orjson.dumps({"id": f"evt_peer_{i}", "body": body}) for i in ids],
            [0] * len(ids),
        )


async def peer(b: core.Bench) -> dict[str, Any]:
    if importlib.util.find_spec("pgqueuer") is None:
        return {"skipped": "pgqueuer is not installed (pip install -e '.[dev]')"}
    o = b.o
    shape = throughput.SHAPES[0]
    tag = "peer"
    urls = [b.receiver.url("ok", tag, i) for i in range(shape.subscriptions)]
    await _enqueue(b, o.events, len(urls))
    await b.db.conn.execute("ANALYZE")
    child = procs.Child(peer_child, b.db.dsn, urls, shape.max_in_flight, o.scenario_timeout_seconds)
    drained = await b.drain_child(child, tag, "peer (pgqueuer + aiohttp)")
    return {
        "shape": shape.name,
        "subscriptions": shape.subscriptions,
        "max_in_flight": shape.max_in_flight,
        "pgqueuer": importlib.metadata.version("pgqueuer"),
        **drained,
    }
