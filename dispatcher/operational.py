"""The loop that writes the dead-letter summaries of finished minutes.

Every other operational event is written by a trigger in the transaction of its change
(sql/011_operational_events.sql); a summary covers a whole minute, so it is written once the
minute is over, here. Sends no HTTP and decides nothing about deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from dispatcher.db import operational as db_operational
from dispatcher.db import pool as db_pool

log = structlog.get_logger("dispatcher.operational")


class SummaryFlusher:
    def __init__(self, pool: Any, *, interval_seconds: float) -> None:
        self._pool = pool
        self._interval = interval_seconds

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                written = await db_operational.flush_dead_summaries(self._pool)
                if written:
                    log.info("dead_letter_summaries_written", count=written)
            except db_pool.ERRORS as exc:
                log.warning("dead_letter_summary_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
