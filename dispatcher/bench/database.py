"""The bench's own database: created fresh on the chosen server, migrated, seeded, dropped.

Bench-only SQL (seeding pre-routed work, counting what is unfinished); never used by the
dispatcher itself.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from dispatcher.bench import measure, options

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
    def __init__(self, server_dsn: str, say: measure.Progress) -> None:
        self.name = f"dispatcher_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.server_dsn = server_dsn
        self.dsn = measure.with_database(server_dsn, self.name)
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
            _SUBSCRIBE,
            url,
            list(event_types),
            options.SECRET,
            options.SIGNATURE_HEADER,
            max_in_flight,
        )
        return sub

    async def seed(self, subs: Sequence[uuid.UUID], n: int, payload_bytes: int) -> float:
        """Insert n routed events with a pending delivery each; returns seconds taken."""
        started = time.monotonic()
        chunk = 100_000
        prefix = f"evt_{uuid.uuid4().hex[:8]}_"
        for lo in range(1, n + 1, chunk):
            hi = min(n, lo + chunk - 1)
            await self.conn.execute(
                _SEED, prefix, measure.payload_pad(payload_bytes), lo, hi, list(subs)
            )
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
