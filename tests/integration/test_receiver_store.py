"""The receiver toolkit's Postgres idempotency store on a real database: it remembers
processed webhook-ids across store instances (a restarted receiver) and under concurrency."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from dispatcher import receiver, signing
from tests import support

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


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


def _start_receiver(dsn: str, tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.receiver_process",
            dsn,
            "cross_receipts",
            SECRET,
            str(tmp_path / "hold"),
            str(tmp_path / f"fail-{name}"),
            str(tmp_path / "processed"),
        ],
        cwd=support.ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), line
    return proc, int(line)


async def test_concurrent_duplicates_across_two_processes(
    pool: Any, dsn: str, tmp_path: Path
) -> None:
    """Process A is still working on an id when its duplicate reaches process B: B must not
    answer 200 (the sender would take it as delivered, and A then fails). The database says
    the id is in progress, so B answers a retryable 503; the retry after A's failure is
    processed once."""
    (tmp_path / "hold").touch()
    (tmp_path / "fail-a").touch()
    a, port_a = await asyncio.to_thread(_start_receiver, dsn, tmp_path, "a")
    b, port_b = await asyncio.to_thread(_start_receiver, dsn, tmp_path, "b")
    try:
        body = b'{"n": 1}'
        ts = int(time.time())
        headers = {
            "content-type": "application/json",
            **signing.sign(
                signing.SignerRegistry.load().for_subscription(None, ()),
                signing.SigningInput("evt_cross", ts, body, (SECRET,)),
            ),
        }
        async with aiohttp.ClientSession() as session:

            async def post(port: int) -> tuple[int, dict[str, Any]]:
                async with session.post(
                    f"http://127.0.0.1:{port}/hook", data=body, headers=headers
                ) as resp:
                    return resp.status, await resp.json()

            first = asyncio.create_task(post(port_a))

            async def a_holds_it() -> bool:
                return bool(
                    await pool.fetchval(
                        "SELECT count(*) FROM cross_receipts WHERE webhook_id = 'evt_cross'"
                    )
                )

            await support.wait_for(a_holds_it, message="A took the id")
            assert await post(port_b) == (503, {"status": "in_progress"})
            (tmp_path / "hold").unlink()
            status, _ = await first
            assert status == 500
            # The sender retries (at B): processed now, and a later copy is a duplicate.
            assert await post(port_b) == (200, {"status": "ok"})
            assert await post(port_a) == (200, {"status": "duplicate"})
        assert (tmp_path / "processed").read_text() == "1\n"
    finally:
        for proc in (a, b):
            proc.terminate()
            proc.wait(10)


async def test_postgres_store_in_progress_lease_and_takeover(pool: Any) -> None:
    store = receiver.PostgresIdempotencyStore(pool, table="lease_receipts", processing_seconds=0.2)
    await store.ensure_table()
    assert await store.begin("msg_1") is receiver.Claim.NEW
    assert await store.begin("msg_1") is receiver.Claim.IN_PROGRESS

    # The holder died: once its lease ran out, the id is taken over (exactly once).
    async def taken_over() -> bool:
        return await store.begin("msg_1") is receiver.Claim.NEW

    await support.wait_for(taken_over, timeout=5, message="lease expiry")
    assert await store.begin("msg_1") is receiver.Claim.IN_PROGRESS
    await store.finish("msg_1")
    assert await store.begin("msg_1") is receiver.Claim.DONE
    results = await asyncio.gather(*(store.begin("msg_2") for _ in range(8)))
    assert sorted(r.value for r in results) == ["in_progress"] * 7 + ["new"]


async def test_rows_of_an_older_table_read_as_done(pool: Any) -> None:
    await pool.execute(
        "CREATE TABLE old_receipts (webhook_id text PRIMARY KEY,"
        " received_at timestamptz NOT NULL DEFAULT now())"
    )
    await pool.execute("INSERT INTO old_receipts (webhook_id) VALUES ('msg_old')")
    store = receiver.PostgresIdempotencyStore(pool, table="old_receipts")
    await store.ensure_table()
    assert await store.begin("msg_old") is receiver.Claim.DONE
    assert await store.begin("msg_new") is receiver.Claim.NEW
