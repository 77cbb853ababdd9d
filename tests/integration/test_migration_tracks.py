"""Migration tracks: the dispatcher's migrations no longer create the reference agent's table;
the agent's own track does, and a database migrated before the split (the former
``002_agent.sql`` recorded in ``dispatcher_migrations``) upgrades on both tracks without
losing a job."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from dispatcher import app
from dispatcher.agent import store
from dispatcher.db import migrate
from dispatcher.db import pool as db_pool


async def _has_table(conn: Any, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


async def test_core_leaves_the_agent_table_to_the_agent_track(empty_dsn: str) -> None:
    assert "002_agent.sql" not in [m.name for m in migrate.load()]
    core = await app.migrate_database(empty_dsn)
    assert core[0] == "001_init.sql"
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert not await _has_table(conn, "agent_jobs")
        assert await migrate.pending(conn, store.MIGRATIONS) == [
            "001_jobs.sql",
            "002_trace_context.sql",
        ]
    finally:
        await conn.close()

    assert await app.migrate_database(empty_dsn, store.MIGRATIONS) == [
        "001_jobs.sql",
        "002_trace_context.sql",
    ]
    assert await app.migrate_database(empty_dsn, store.MIGRATIONS) == []
    assert await app.migrate_database(empty_dsn) == []
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await _has_table(conn, "agent_jobs")
        assert await migrate.pending(conn, store.MIGRATIONS) == []
        # Each track keeps its own books.
        agent_books = await conn.fetch("SELECT version, name FROM agent_migrations")
        assert [tuple(r) for r in agent_books] == [
            (1, "001_jobs.sql"),
            (2, "002_trace_context.sql"),
        ]
        core_names = await conn.fetch("SELECT name FROM dispatcher_migrations")
        assert "001_jobs.sql" not in {r["name"] for r in core_names}
    finally:
        await conn.close()


async def test_the_guard_names_the_track_that_is_behind(empty_dsn: str) -> None:
    await app.migrate_database(empty_dsn)
    pool = await db_pool.create_pool(empty_dsn, min_size=1, max_size=1)
    try:
        await migrate.require_current(pool)  # the dispatcher needs only its own track
        with pytest.raises(migrate.SchemaNotReady) as caught:
            await migrate.require_current(pool, migrate.CORE, store.MIGRATIONS)
        assert "001_jobs.sql, 002_trace_context.sql of the agent track" in str(caught.value)
        assert "run `dispatcher agent --migrate` first" in str(caught.value)
    finally:
        await pool.close()


async def test_a_database_migrated_before_the_split_upgrades_in_place(empty_dsn: str) -> None:
    """The core recorded version 2 (``002_agent.sql``) and created agent_jobs: the core
    migrator ignores the version it no longer has, and the agent track adopts the table."""
    await app.migrate_database(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        # The former core migration (the same statements without IF NOT EXISTS), recorded in
        # the core's books.
        await conn.execute(_former_002_sql())
        await conn.execute(
            "INSERT INTO dispatcher_migrations (version, name, checksum) VALUES (2, $1, $2)",
            "002_agent.sql",
            "checksum-of-the-former-file",
        )
        await conn.execute(
            """
            INSERT INTO agent_jobs (id, prospects, criteria, webhook_url, subscription_id)
            VALUES ('lq-0123456789abcdef0123', '[]', '{}', 'http://127.0.0.1:1/', $1)
            """,
            uuid.uuid4(),
        )
    finally:
        await conn.close()

    assert await app.migrate_database(empty_dsn) == []
    assert await app.migrate_database(empty_dsn, store.MIGRATIONS) == [
        "001_jobs.sql",
        "002_trace_context.sql",
    ]
    pool = await db_pool.create_pool(empty_dsn, min_size=1, max_size=1)
    try:
        await migrate.require_current(pool, migrate.CORE, store.MIGRATIONS)
        assert await pool.fetchval("SELECT count(*) FROM agent_jobs") == 1
    finally:
        await pool.close()


def _former_002_sql() -> str:
    jobs = migrate.load(store.MIGRATIONS)[0]
    assert jobs.name == "001_jobs.sql"
    return jobs.sql.replace(" IF NOT EXISTS", "")
