"""The hand-made comparisons, run as spawned children: the ceiling (raw aiohttp POSTs, no
database) and the naive loop (claim a batch → sign → gather → mark done).

Deliberately simple: they show what the machine and a 40-line loop can do. Never imported by
the dispatcher.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from typing import Any

import aiohttp
import asyncpg

from dispatcher import signing
from dispatcher.bench import options, procs


def _static_headers(body: bytes) -> dict[str, str]:
    ts = int(time.time())
    item = signing.SigningInput(
        "evt_ceiling", ts, body, (options.SECRET,), options.SIGNATURE_HEADER
    )
    mac = hmac.new(
        signing.secret_key_bytes(options.SECRET), f"evt_ceiling.{ts}.".encode() + body, "sha256"
    )
    return {
        "content-type": "application/json",
        "webhook-id": item.msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
    }


async def _ceiling(url: str, total: int, concurrency: int, body: bytes) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    headers = _static_headers(body)
    remaining = [total]
    async with aiohttp.ClientSession(
        connector=connector, skip_auto_headers=("Accept-Encoding",)
    ) as session:

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def ceiling_child(url: str, total: int, concurrency: int, body: bytes) -> None:
    procs.run_loop(_ceiling(url, total, concurrency, body), uvloop_ok=True)


def signed_headers(key: bytes, event_id: str, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers, written out by hand as a user's own loop would."""
    ts = str(int(time.time()))
    mac = hmac.new(key, f"{event_id}.{ts}.".encode() + body, hashlib.sha256)
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
    }


_NAIVE_CLAIM = """
-- The naive baseline: lock a batch of pending rows (SKIP LOCKED), mark them taken, return what a
-- request needs. No per-subscription caps, no ordering, no fencing, no attempt log.
-- Rows by primary key (ANY(ARRAY(...))): a join on the locking subquery gets a sequential
-- scan from the planner, and the baseline should be naive in its loop, not in its plan.
UPDATE webhook_deliveries d
SET state = 'in_flight', attempt = d.attempt + 1, leased_until = now() + interval '60 s'
FROM webhook_outbox o, webhook_subscriptions s
WHERE d.id = ANY (ARRAY(SELECT id FROM webhook_deliveries WHERE state = 'pending'
                        LIMIT $1 FOR UPDATE SKIP LOCKED))
  AND o.id = d.outbox_id AND s.id = d.subscription_id
RETURNING d.id, o.event_id, o.payload::text AS body, s.url, s.secret
"""
_NAIVE_DONE = """
UPDATE webhook_deliveries SET state = 'delivered', leased_until = NULL, finished_at = now(),
       updated_at = now()
WHERE id = ANY($1::bigint[])
"""


async def _naive(dsn: str, deadline_seconds: float, batch: int) -> None:
    conn = await asyncpg.connect(dsn)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=batch))
    deadline = time.monotonic() + deadline_seconds
    try:

        async def post(row: Any) -> int | None:
            body = row["body"].encode()
            key = signing.secret_key_bytes(row["secret"])
            headers = signed_headers(key, row["event_id"], body)
            try:
                async with session.post(row["url"], data=body, headers=headers) as resp:
                    await resp.read()
                    return row["id"] if 200 <= resp.status < 300 else None
            except aiohttp.ClientError:
                return None

        while time.monotonic() < deadline:
            rows = await conn.fetch(_NAIVE_CLAIM, batch)
            if not rows:
                return
            done = await asyncio.gather(*(post(r) for r in rows))
            await conn.execute(_NAIVE_DONE, [i for i in done if i is not None])
    finally:
        await session.close()
        await conn.close()


def naive_child(dsn: str, deadline_seconds: float, batch: int) -> None:
    # The default event loop on purpose: this is the loop the baseline figure used.
    procs.run_loop(_naive(dsn, deadline_seconds, batch), uvloop_ok=False)
