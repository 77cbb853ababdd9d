"""The producer API: put an event into the outbox on the caller's own connection.

The insert joins whatever transaction the caller has open, so the event commits or rolls back
with the business change. Nothing here talks HTTP or knows about subscriptions.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

import orjson


class _Executor(Protocol):
    async def fetchval(self, query: str, *args: Any) -> Any: ...


# Plain SQL for producers in other languages; $5 may be NULL for a generated event_id.
INSERT_SQL = """
INSERT INTO webhook_outbox (event_type, payload, subscription_id, ordering_key, event_id)
VALUES ($1, $2::jsonb, $3, $4, COALESCE($5, 'evt_' || replace(gen_random_uuid()::text, '-', '')))
RETURNING event_id
"""


async def publish(
    conn: _Executor,
    event_type: str,
    payload: Any,
    *,
    event_id: str | None = None,
    subscription_id: uuid.UUID | str | None = None,
    ordering_key: str | None = None,
) -> str:
    """Insert one event into ``webhook_outbox`` and return its ``event_id``.

    ``payload`` is any JSON-serialisable value (or ``bytes``/``str`` already holding JSON).
    A second publish with the same ``event_id`` raises ``asyncpg.UniqueViolationError``, so a
    retried producer transaction cannot publish twice."""
    if not isinstance(event_type, str) or not event_type:
        raise ValueError("event_type must be a non-empty string")
    if isinstance(payload, bytes | bytearray):
        body = bytes(payload).decode()
    elif isinstance(payload, str):
        body = payload
    else:
        body = orjson.dumps(payload).decode()
    sub = uuid.UUID(str(subscription_id)) if subscription_id is not None else None
    result: str = await conn.fetchval(INSERT_SQL, event_type, body, sub, ordering_key, event_id)
    return result
