"""The producer API: put an event into the outbox on the caller's own connection.

The insert joins whatever transaction the caller has open, so the event commits or rolls back
with the business change (the statement is ``dispatcher.db.outbox.INSERT_SQL``). Nothing here
talks HTTP or knows about subscriptions.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from dispatcher.db import outbox


async def publish(
    conn: outbox.Executor,
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
    return await outbox.insert(
        conn, event_type, body, subscription_id=sub, ordering_key=ordering_key, event_id=event_id
    )
