"""The producer's statement: one event into ``webhook_outbox`` on the caller's connection.

``dispatcher.publish`` (the public API) validates and encodes, then calls :func:`insert`;
producers in other languages run ``INSERT_SQL`` as it stands. No transaction of its own: the
insert joins whatever the caller has open.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol


class Executor(Protocol):
    async def fetchval(self, query: str, *args: Any) -> Any: ...


# Plain SQL for producers in other languages; $5 may be NULL for a generated event_id, and
# $6/$7 (W3C traceparent/tracestate of the producer's span) NULL when there is no trace.
INSERT_SQL = """
INSERT INTO webhook_outbox (event_type, payload, subscription_id, ordering_key, event_id,
                            traceparent, tracestate)
VALUES ($1, $2::jsonb, $3, $4, COALESCE($5, 'evt_' || replace(gen_random_uuid()::text, '-', '')),
        $6, $7)
RETURNING event_id
"""


async def insert(
    conn: Executor,
    event_type: str,
    body: str,
    *,
    subscription_id: uuid.UUID | None,
    ordering_key: str | None,
    event_id: str | None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> str:
    """Insert one event (``body`` already JSON text) and return its ``event_id``."""
    # Plain insert; the unique event_id refuses a second publish of the same event.
    result: str = await conn.fetchval(
        INSERT_SQL,
        event_type,
        body,
        subscription_id,
        ordering_key,
        event_id,
        traceparent,
        tracestate,
    )
    return result
