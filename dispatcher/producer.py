"""The producer API: put an event into the outbox on the caller's own connection.

The insert joins whatever transaction the caller has open, so the event commits or rolls back
with the business change (the statement is ``dispatcher.db.outbox.INSERT_SQL``). The active
OpenTelemetry span (if any) is stored with the event, so its deliveries continue the caller's
trace. Nothing here talks HTTP or knows about subscriptions.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from dispatcher import tracing, validation
from dispatcher.db import outbox


async def publish(
    conn: outbox.Executor,
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
    if event_id is not None:
        # Refused before the database does it (webhook_outbox_event_id_printable).
        validation.validate_event_id(event_id)
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
    return await outbox.insert(
        conn,
        event_type,
        body,
        subscription_id=sub,
        ordering_key=ordering_key,
        event_id=event_id,
        traceparent=traceparent,
        tracestate=tracestate,
    )
