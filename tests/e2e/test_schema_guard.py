"""`dispatcher run` and `dispatcher agent` refuse to serve on a schema behind the code."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests import support


@pytest.fixture
async def empty_dsn(server_dsn: str) -> AsyncIterator[str]:
    name = f"empty_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield support.with_database(server_dsn, name)
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


@pytest.mark.parametrize("command", [["run"], ["agent"]])
def test_unmigrated_database_is_a_clear_error(
    empty_dsn: str, command: list[str], tmp_path: Path
) -> None:
    log = tmp_path / "out.log"
    proc = support.spawn_dispatcher(
        empty_dsn,
        args=command,
        extra_env={"AGENT_WEBHOOK_SECRET": "whsec_" + "A" * 32},
        log_path=log,
    )
    try:
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 2
    text = log.read_text()
    assert "run `dispatcher migrate` first" in text
    assert "001_init.sql" in text
