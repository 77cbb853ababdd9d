"""The stored trace context of claimed deliveries, read when tracing is on.

A stopgap until the claim returns ``traceparent``/``tracestate`` with each job: one extra
query per claim batch, made only by ``tracing.Tracing`` (never with tracing off). Plain
reads, no locks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_SQL = """
-- No locks: an outbox row's trace context is written once, by its producer's INSERT.
SELECT d.id, o.traceparent, o.tracestate
FROM webhook_deliveries d
JOIN webhook_outbox o ON o.id = d.outbox_id
WHERE d.id = ANY ($1::bigint[]) AND o.traceparent IS NOT NULL
"""


async def for_deliveries(
    pool: Any, delivery_ids: Sequence[int]
) -> dict[int, tuple[str, str | None]]:
    """delivery id → (traceparent, tracestate), for the deliveries whose event has one."""
    rows = await pool.fetch(_SQL, list(delivery_ids))
    return {r["id"]: (r["traceparent"], r["tracestate"]) for r in rows}
