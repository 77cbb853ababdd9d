"""A small TCP fault proxy for putting in front of Postgres (or anything else) in tests.

Faults: ``cut()`` drops every open connection at once (a restart or a network blip as the
client sees it); ``down()``/``up()`` refuse new connections meanwhile; ``freeze()``/``thaw()``
stop forwarding bytes without closing anything (a half-open connection, a paused server).
Loopback only; nothing here sleeps to wait for a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        # A host starting with "/" is a Unix socket directory (libpq convention).
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._up = True
        self._flowing = asyncio.Event()
        self._flowing.set()

    @classmethod
    def for_dsn(cls, dsn: str) -> FaultProxy:
        parts = urllib.parse.urlsplit(dsn)
        query = dict(urllib.parse.parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or "127.0.0.1"
        return cls(host, int(query.get("port") or parts.port or 5432))

    def dsn(self, dsn: str) -> str:
        """``dsn`` rewritten to go through the proxy."""
        parts = urllib.parse.urlsplit(dsn)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        query = "&".join(
            q for q in parts.query.split("&") if q and not q.startswith(("host=", "port="))
        )
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    @property
    def open_connections(self) -> int:
        return len(self._pipes)

    def cut(self) -> int:
        """Close every open connection (both sides); returns how many."""
        pipes = list(self._pipes)
        for client, server in pipes:
            for w in (client, server):
                with contextlib.suppress(Exception):
                    w.transport.abort()
        self._pipes.clear()
        self.cuts += 1
        return len(pipes)

    def down(self) -> None:
        self._up = False

    def up(self) -> None:
        self._up = True

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            host, port = self.target
            if host.startswith("/"):
                up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pipes.add(pair)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._pipes.discard(pair)
            for w in pair:
                with contextlib.suppress(Exception):
                    w.transport.abort()
