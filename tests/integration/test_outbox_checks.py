"""The outbox table refuses event ids the dispatcher could never send, so a producer writing
plain SQL hears about it from its own INSERT; the Python producer refuses them first."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from dispatcher import producer, validation
from dispatcher.db import migrate

BAD_IDS = ["evt\n1", "evt\r1", "evt\x7f1", "evt\t1", "evt\x0b1", "evt\x851"]


@pytest.mark.parametrize("event_id", BAD_IDS)
async def test_plain_sql_insert_of_a_control_character_event_id_fails(
    pool: Any, event_id: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as raised:
        await pool.execute(
            "INSERT INTO webhook_outbox (event_id, event_type, payload) VALUES ($1, 'a.b', '{}')",
            event_id,
        )
    assert raised.value.constraint_name == "webhook_outbox_event_id_printable"
    assert await pool.fetchval("SELECT count(*) FROM webhook_outbox") == 0


async def test_ordinary_event_ids_still_insert(pool: Any) -> None:
    for event_id in ("evt_1", "order:42/v2", "ünïcode-id", "a b"):
        await pool.execute(
            "INSERT INTO webhook_outbox (event_id, event_type, payload) VALUES ($1, 'a.b', '{}')",
            event_id,
        )
    await pool.execute("INSERT INTO webhook_outbox (event_type, payload) VALUES ('a.b', '{}')")
    assert await pool.fetchval("SELECT count(*) FROM webhook_outbox") == 5


@pytest.mark.parametrize("event_id", BAD_IDS)
async def test_the_producer_refuses_before_the_database(pool: Any, event_id: str) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(validation.ValidationError) as raised:
            await producer.publish(conn, "a.b", {}, event_id=event_id)
    assert raised.value.code == "invalid_event_id"


async def test_old_rows_do_not_stop_the_migration(empty_dsn: str) -> None:
    # Everything before this migration, one bad row written under the old rules, then the rest.
    conn = await asyncpg.connect(empty_dsn)
    try:
        migrations = migrate.load()
        head = [m for m in migrations if m.version < 8]
        for m in head:
            await conn.execute(m.sql)
        await conn.execute(
            "INSERT INTO webhook_outbox (event_id, event_type, payload) VALUES ($1, 'a.b', '{}')",
            "old\nrow",
        )
        for m in migrations:
            if m.version >= 8:
                await conn.execute(m.sql)
        validated = await conn.fetchval(
            "SELECT convalidated FROM pg_constraint WHERE conname = "
            "'webhook_outbox_event_id_printable'"
        )
        assert validated is False
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO webhook_outbox (event_id, event_type, payload) "
                "VALUES ('new\nrow', 'a.b', '{}')"
            )
    finally:
        await conn.close()
