"""The ack writer: a row the database rejects cannot hold back the rest of its batch."""

from __future__ import annotations

import asyncio
from typing import Any

import prometheus_client as prom

import dispatcher
from dispatcher import claimer, metrics
from dispatcher.db import repository
from tests import support


async def test_a_rejected_row_is_split_out_and_the_rest_is_written(pool: Any) -> None:
    repo = repository.Repository(pool)
    await repo.create_subscription(
        url="http://127.0.0.1:9/", event_types=["*"], secret="whsec_" + "A" * 32
    )
    async with pool.acquire() as conn:
        for i in range(4):
            await dispatcher.publish(conn, "e", {"i": i})
    await repo.route(10)
    jobs = await repo.claim("w", 10, lease_seconds=30)
    assert len(jobs) == 4
    written = asyncio.Event()
    writer = claimer.AckWriter(
        repo, "w", metrics.Metrics(prom.CollectorRegistry()), batch=10, on_written=written.set
    )
    for n, job in enumerate(jobs):
        # Postgres refuses NUL in text: this row's batch fails as a whole.
        writer.put(support.ack(job, response="bad\x00byte" if n == 2 else "ok"))
    writer.close()
    await asyncio.wait_for(writer.run(), 10)
    states = dict(await pool.fetch("SELECT id, state FROM webhook_deliveries"))
    bad = jobs[2].delivery_id
    assert states.pop(bad) == "in_flight"  # left for its lease to expire: retried, not lost
    assert set(states.values()) == {"delivered"}
    assert await pool.fetchval("SELECT count(*) FROM webhook_attempts") == 3
