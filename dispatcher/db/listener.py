"""LISTEN/NOTIFY wake-ups on a dedicated connection that re-listens after it is lost.

Notifications are hints only: the dispatcher also polls, and after every (re)connect it asks
for a full scan, so a notification lost while the connection was down costs latency, not data.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from dispatcher import logs
from dispatcher.db import pool as db_pool

log = structlog.get_logger("dispatcher.listener")


class Listener:
    """Calls ``callbacks[channel]()`` per notification and ``on_connect()`` after each connect."""

    def __init__(
        self,
        dsn: str,
        callbacks: Mapping[str, Callable[[], None]],
        *,
        on_connect: Callable[[], None],
        connect: Callable[[str], Awaitable[Any]] | None = None,
        check_interval_seconds: float = 1.0,
        max_backoff_seconds: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._callbacks = dict(callbacks)
        self._on_connect = on_connect
        self._connect = connect or (
            lambda dsn: db_pool.connect(dsn, application_name="dispatcher-listen")
        )
        self._check_interval = check_interval_seconds
        self._max_backoff = max_backoff_seconds
        self._conn: Any = None
        self.reconnects = 0
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            try:
                await self._listen_until_lost(stop)
                delay = 0.1
            except db_pool.ERRORS as exc:
                # A lost listen connection only costs wake-up latency; polling goes on.
                self.connected.clear()
                log.warning("listen_connection_lost", error=logs.error_text(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, self._max_backoff)
        await self._close()

    async def _listen_until_lost(self, stop: asyncio.Event) -> None:
        self._conn = await self._connect(self._dsn)
        lost = asyncio.Event()
        self._conn.add_termination_listener(lambda _c: lost.set())
        for channel, callback in self._callbacks.items():
            await self._conn.add_listener(channel, _adapter(callback))
        if self.reconnects:
            log.info("listen_reconnected", reconnects=self.reconnects)
        self.reconnects += 1
        self.connected.set()
        self._on_connect()
        while not stop.is_set() and not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._check_interval)
            if stop.is_set():
                break
            # A half-open TCP connection raises nothing until used: probe it.
            await asyncio.wait_for(self._conn.fetchval("SELECT 1"), 5)
        if lost.is_set() and not stop.is_set():
            raise ConnectionError("listen connection terminated")

    async def _close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)
        self._conn = None


def _adapter(callback: Callable[[], None]) -> Callable[..., None]:
    def on_notify(_conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        callback()

    return on_notify
