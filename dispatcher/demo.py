"""``dispatcher demo``: a small end-to-end run on whatever database the CLI resolved.

Migrates, starts a dispatcher and a verifying example receiver on 127.0.0.1, publishes a few
events through the outbox, prints each webhook as it arrives, then shuts everything down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import asyncpg
from aiohttp import web

import dispatcher
from dispatcher import app, config, signing
from dispatcher.db import repository
from dispatcher.examples import receiver as example_receiver

DEMO_EVENTS = 5
DEADLINE_SECONDS = 30.0


async def run(dsn: str, *, env: Mapping[str, str]) -> int:
    print("▶ migrating", flush=True)
    await app.migrate_database(dsn)
    secret = signing.generate_secret()
    arrived: list[dict[str, Any]] = []
    all_arrived = asyncio.Event()

    async def on_event(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        arrived.append(payload)
        if len(arrived) >= DEMO_EVENTS:
            all_arrived.set()
        print(
            f"  ✓ webhook {headers.get('webhook-id')}  n={payload.get('n')}  verified", flush=True
        )

    receiver_app = example_receiver.build_app(secret, on_event=on_event)
    runner = web.AppRunner(receiver_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/webhooks"
    print(f"▶ receiver on {url}", flush=True)

    settings = config.Settings(
        database_url=dsn,
        listen_port=0,
        poll_interval_seconds=0.2,
        allow_cidrs=("127.0.0.1/32",),
        shutdown_grace_seconds=5,
    )
    d = app.Dispatcher(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    await asyncio.wait_for(d.ready.wait(), 20)
    conn = await asyncpg.connect(dsn)
    try:
        sub = await repository.Repository(d.pool).create_subscription(
            url=url, event_types=["demo.*"], secret=secret, signature_header="X-AgentX-Signature"
        )
        print(f"▶ subscription {sub['id']} → {url}", flush=True)
        for n in range(DEMO_EVENTS):
            async with conn.transaction():
                await dispatcher.publish(conn, "demo.created", {"n": n}, subscription_id=sub["id"])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_arrived.wait(), DEADLINE_SECONDS)
    finally:
        await conn.close()
        stop.set()
        await task
        await runner.cleanup()
    ok = len(arrived) == DEMO_EVENTS
    print(f"▶ {len(arrived)}/{DEMO_EVENTS} webhooks delivered and verified", flush=True)
    return 0 if ok else 1
