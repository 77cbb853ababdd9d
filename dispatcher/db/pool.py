"""asyncpg pool factory with the session limits every dispatcher connection runs under.

Timeouts keep one stuck statement or forgotten transaction from holding locks that the
claimers of other replicas are waiting on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg

# What a lost, restarted or terminated server looks like to asyncpg. InternalClientError is in
# here because asyncpg raises it when a backend is terminated mid-operation
# (MagicStack/asyncpg#784, #1069); every loop must treat it as "retry later", not as a crash.
ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

SESSION_SETTINGS = {
    "application_name": "dispatcher",
    "statement_timeout": "30s",
    "lock_timeout": "10s",
    "idle_in_transaction_session_timeout": "60s",
    # Every statement here is short. On a deep backlog the claim's generic plan is costed
    # above jit_above_cost, and compiling it took ~45 ms against ~10 ms of running it
    # (1 M pending deliveries, EXPLAIN ANALYZE via auto_explain).
    "jit": "off",
}


def server_settings(
    application_name: str = "dispatcher", extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    return {**SESSION_SETTINGS, "application_name": application_name, **(extra or {})}


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    application_name: str = "dispatcher",
    extra_settings: Mapping[str, str] | None = None,
    reset_session: bool = True,
) -> Any:
    """A pool whose connections carry :data:`SESSION_SETTINGS` (and ``extra_settings``:
    session settings the schema's triggers read; a reset keeps them, they are the session's
    defaults).

    ``reset_session=False`` is for callers that never leave session state behind (no SET,
    LISTEN, cursors or session-level advisory locks): a released connection then skips the
    reset statement, a round trip per release (an open transaction is still rolled back)."""
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings=server_settings(application_name, extra_settings),
        command_timeout=60,
        reset=None if reset_session else _keep_session,
    )


async def _keep_session(_conn: Any) -> None:
    return None


async def connect(dsn: str, *, application_name: str = "dispatcher") -> Any:
    """One connection outside the pool (LISTEN, migrations)."""
    return await asyncpg.connect(dsn, server_settings=server_settings(application_name))
