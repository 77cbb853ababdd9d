"""Operational events: what callers tell the triggers that write them, and the summary flush.

The events themselves (``dispatcher.subscription.*``, ``dispatcher.delivery.dead``,
``dispatcher.deliveries.dead_summary``) are written by triggers in sql/011_operational_events.sql,
in the transaction of the change they report; this module only names the change for them
(transaction-local settings) and writes the per-minute dead-letter summaries. It must not
write an operational event itself: a second writer would announce a change twice.
"""

from __future__ import annotations

import datetime
from typing import Any, Final

# What a disable was (the ``reason`` of dispatcher.subscription.disabled); an unnamed change
# is an operator's.
OPERATOR: Final = "operator"
GONE: Final = "gone"
FAILING: Final = "failing"
# A secret sealed again under a new key: the same secret, so no rotation is announced.
RESEAL: Final = "reseal"

# Session setting the dead-letter trigger reads: dispatcher.delivery.dead events per
# subscription and minute before the rest collapse into the minute's summary.
DEAD_EVENTS_SETTING: Final = "dispatcher.dead_events_per_minute"

# Transaction-local (is_local = true): they name only the change made in this transaction.
MARK_CHANGE_SQL: Final = "SELECT set_config('dispatcher.change_kind', $1, true)"
MARK_RATIO_SQL: Final = "SELECT set_config('dispatcher.failure_ratio', $1, true)"
# The reserved 'dispatcher.' event types may be inserted by this transaction: only for an
# event the dispatcher itself publishes (the subscription test event).
EMITTING_SQL: Final = "SELECT set_config('dispatcher.emitting', 'on', true)"


async def flush_dead_summaries(pool: Any, now: datetime.datetime | None = None) -> int:
    """Write one ``dispatcher.deliveries.dead_summary`` per subscription and finished minute
    that suppressed dead letters; the number written. ``now`` (default: the database clock)
    says which minutes are finished."""
    # Row locks with SKIP LOCKED inside the function: replicas flush disjoint rows.
    if now is None:
        return int(await pool.fetchval("SELECT dispatcher_flush_dead_summaries()"))
    return int(await pool.fetchval("SELECT dispatcher_flush_dead_summaries($1)", now))
