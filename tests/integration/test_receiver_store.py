"""The receiver toolkit's Postgres idempotency store on a real database: it remembers
processed webhook-ids across store instances (a restarted receiver) and under concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

from dispatcher import receiver


async def test_postgres_store_survives_a_new_store_instance(pool: Any) -> None:
    store = receiver.PostgresIdempotencyStore(pool, table="test_receipts")
    await store.ensure_table()
    await store.ensure_table()  # idempotent
    assert await store.seen_or_remember("msg_1") is False
    # A "restarted" receiver: a fresh store object on the same table.
    restarted = receiver.PostgresIdempotencyStore(pool, table="test_receipts")
    assert await restarted.seen_or_remember("msg_1") is True
    results = await asyncio.gather(*(restarted.seen_or_remember("msg_2") for _ in range(8)))
    assert sorted(results) == [False] + [True] * 7
    await restarted.forget("msg_1")
    assert await store.seen_or_remember("msg_1") is False
    assert await store.prune(older_than_seconds=3600) == 0
    assert await store.prune(older_than_seconds=0) == 2
