"""A receiver process for the cross-process idempotency test: ``webhook_handler`` with a
``PostgresIdempotencyStore``. ``process`` waits until the hold file is gone, then fails once
per process when the fail file exists, so a test can line up concurrent duplicates.

Usage: python -m tests.integration.receiver_process DSN TABLE SECRET HOLD FAIL PROCESSED
Prints the bound port on its first line.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from typing import Any

import asyncpg
from aiohttp import web

from dispatcher import receiver

POLL_SECONDS = 0.02


def _held(hold: str) -> bool:
    return os.path.exists(hold)


def _fail_once(fail: str) -> bool:
    if os.path.exists(fail):
        os.unlink(fail)
        return True
    return False


def _record(processed: str, n: int) -> None:
    with open(processed, "a") as out:
        out.write(f"{n}\n")


async def main(dsn: str, table: str, secret: str, *files: str) -> None:
    hold, fail, processed = files
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    store = receiver.PostgresIdempotencyStore(pool, table=table)
    await store.ensure_table()

    async def process(payload: dict[str, Any], _headers: Mapping[str, str]) -> None:
        # The hold is a file so the test (another process) can release it.
        while _held(hold):  # noqa: ASYNC110
            await asyncio.sleep(POLL_SECONDS)
        if _fail_once(fail):
            raise RuntimeError("processing failed once")
        _record(processed, payload["n"])

    app = web.Application()
    app.router.add_post(
        "/hook", receiver.webhook_handler(receiver.Verifier(secret), store, process)
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
