"""The producer API: put an event into the outbox on the caller's own connection.

The insert joins whatever transaction the caller has open, so the event commits or rolls back
with the business change. The active OpenTelemetry span (if any) is stored with the event, so
its deliveries continue the caller's trace. Nothing here talks HTTP or knows about
subscriptions.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

import orjson

from dispatcher import tracing


class _Executor(Protocol):
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


async def publish(
    conn: _Executor,
    event_type: str,
    payload: Any,
    *,
    event_id: str | None = None,
    subscription_id: uuid.UUID | str | None = None,
    ordering_key: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> str:
    """Insert one event into ``webhook_outbox`` and return its ``event_id``.

    ``payload`` is any JSON-serialisable value (or ``bytes``/``str`` already holding JSON).
    A second publish with the same ``event_id`` raises ``asyncpg.UniqueViolationError``, so a
    retried producer transaction cannot publish twice.

    ``traceparent``/``tracestate`` (W3C Trace Context) default to the active OpenTelemetry
    span's; pass them to continue a trace received from elsewhere (a malformed value raises
    ``ValueError``)."""
    if not isinstance(event_type, str) or not event_type:
        raise ValueError("event_type must be a non-empty string")
    if isinstance(payload, bytes | bytearray):
        body = bytes(payload).decode()
    elif isinstance(payload, str):
        body = payload
    else:
        body = orjson.dumps(payload).decode()
    sub = uuid.UUID(str(subscription_id)) if subscription_id is not None else None
    if traceparent is None:
        traceparent, tracestate = tracing.current_context()
    else:
        given = traceparent
        traceparent = tracing.parse_traceparent(given)
        if traceparent is None:
            raise ValueError(f"traceparent {given!r} is not a W3C traceparent value")
        if tracestate is not None and tracing.clean_tracestate(tracestate) is None:
            raise ValueError("tracestate must be printable ASCII of at most 512 characters")
    result: str = await conn.fetchval(
        INSERT_SQL, event_type, body, sub, ordering_key, event_id, traceparent, tracestate
    )
    return result
