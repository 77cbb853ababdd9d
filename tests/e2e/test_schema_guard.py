"""`dispatcher run` and `dispatcher agent` refuse to serve on a schema behind the code."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dispatcher import app
from tests import support


def _exit(dsn: str, command: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run a dispatcher command to its exit; its code and what it printed."""
    log = tmp_path / "out.log"
    proc = support.spawn_dispatcher(
        dsn,
        args=command,
        extra_env={"AGENT_WEBHOOK_SECRET": "whsec_" + "A" * 32},
        log_path=log,
    )
    try:
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, log.read_text()


@pytest.mark.parametrize("command", [["run"], ["agent"]])
def test_unmigrated_database_is_a_clear_error(
    empty_dsn: str, command: list[str], tmp_path: Path
) -> None:
    code, text = _exit(empty_dsn, command, tmp_path)
    assert code == 2
    assert "run `dispatcher migrate` first" in text
    assert "001_init.sql" in text


def test_agent_without_its_track_names_the_agent_migration(empty_dsn: str, tmp_path: Path) -> None:
    """The dispatcher's schema is current but the agent's own track is not applied."""
    asyncio.run(app.migrate_database(empty_dsn))
    code, text = _exit(empty_dsn, ["agent"], tmp_path)
    assert code == 2
    assert "run `dispatcher agent --migrate` first" in text
