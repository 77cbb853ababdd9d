"""Cursor pagination neither skips nor repeats rows while new rows arrive between pages."""

from __future__ import annotations

import asyncio
from typing import Any

from dispatcher.db import repository
from tests.integration.api_support import Client, api

__all__ = ["api"]  # the fixture, imported for pytest


async def _parked_subscription(pool: Any) -> str:
    repo = repository.Repository(pool)
    sub = await repo.create_subscription(
        url="http://127.0.0.1:9/never", event_types=["x"], secret="whsec_" + "A" * 32
    )
    # Disabled: its deliveries stay parked, so the running dispatcher leaves them alone.
    await repo.disable_subscription(sub["id"], "pagination test")
    return str(sub["id"])


async def _insert_deliveries(pool: Any, sub: str, n: int) -> list[int]:
    rows = await pool.fetch(
        """
        WITH o AS (
            INSERT INTO webhook_outbox (event_type, payload, subscription_id, routed_at,
                                        route_result, delivery_count)
            SELECT 'x', '{}'::jsonb, $1::uuid, now(), 'routed', 1 FROM generate_series(1, $2)
            RETURNING id, created_at
        )
        INSERT INTO webhook_deliveries (outbox_id, subscription_id, event_created_at, state)
        SELECT o.id, $1::uuid, o.created_at, 'parked' FROM o
        RETURNING id
        """,
        sub,
        n,
    )
    return [r["id"] for r in rows]


async def _insert_unrouted(pool: Any, n: int) -> list[str]:
    rows = await pool.fetch(
        """
        INSERT INTO webhook_outbox (event_type, payload, routed_at, route_result, delivery_count)
        SELECT 'nobody', '{}'::jsonb, now(), 'unmatched', 0 FROM generate_series(1, $1)
        RETURNING event_id
        """,
        n,
    )
    return [r["event_id"] for r in rows]


async def _walk(api: Client, path: str, key: str, on_page: Any, **params: str) -> list[Any]:
    seen: list[Any] = []
    cursor: str | None = None
    while True:
        query = {"limit": "7", **params} | ({"cursor": cursor} if cursor else {})
        page = await api.get(path, **query)
        assert page.status == 200, page
        seen += [item[key] for item in page.body["items"]]
        await on_page()
        cursor = page.body["next_cursor"]
        if cursor is None:
            return seen


async def test_delivery_pages_while_deliveries_arrive(api: Client, pool: Any) -> None:
    sub = await _parked_subscription(pool)
    before = await _insert_deliveries(pool, sub, 50)
    arrived: list[int] = []
    stop = asyncio.Event()

    async def producer() -> None:
        # Keeps inserting concurrently with the page requests (yields between batches).
        while not stop.is_set():
            arrived.extend(await _insert_deliveries(pool, sub, 2))
            await asyncio.sleep(0)

    task = asyncio.create_task(producer())

    async def more_between_pages() -> None:
        arrived.extend(await _insert_deliveries(pool, sub, 3))

    try:
        seen = await _walk(api, "/deliveries", "id", more_between_pages, subscription_id=sub)
    finally:
        stop.set()
        await task
    assert len(arrived) > 20
    assert len(seen) == len(set(seen)), "a row was repeated"
    assert set(before) <= set(seen), "a row that existed at the start was skipped"
    assert seen == sorted(seen, reverse=True)
    # Newest first: only rows that existed when page one was read can be on later pages.
    assert set(seen) <= set(before) | {i for i in arrived if i <= seen[0]}


async def test_subscription_pages_while_subscriptions_arrive(api: Client, pool: Any) -> None:
    repo = repository.Repository(pool)

    async def add(n: int) -> list[str]:
        made = []
        for _ in range(n):
            sub = await repo.create_subscription(
                url="http://127.0.0.1:9/x", event_types=["y"], secret="whsec_" + "B" * 32
            )
            made.append(str(sub["id"]))
        return made

    before = await add(20)
    arrived: list[str] = []

    async def more_between_pages() -> None:
        arrived.extend(await add(2))

    seen = await _walk(api, "/subscriptions", "id", more_between_pages)
    assert len(seen) == len(set(seen)), "a row was repeated"
    # Oldest first: the existing rows come in creation order, and rows that arrive during
    # the walk are picked up at the end.
    assert seen[: len(before)] == before
    assert set(seen) <= set(before) | set(arrived)


async def test_unrouted_event_pages_while_events_arrive(api: Client, pool: Any) -> None:
    before = await _insert_unrouted(pool, 30)
    arrived: list[str] = []

    async def more_between_pages() -> None:
        arrived.extend(await _insert_unrouted(pool, 4))

    seen = await _walk(api, "/unrouted-events", "event_id", more_between_pages)
    assert len(seen) == len(set(seen))
    assert set(seen) == set(before)
