"""The benchmark's receiver: a minimal HTTP/1.1 server on 127.0.0.1, run in its own process.

It is a raw ``asyncio.Protocol`` (under uvloop when importable) rather than an aiohttp app:
an aiohttp handler costs the receiver ~4x more CPU per request, and on a small machine the
receiver shares the cores with the dispatcher and Postgres, so a heavier receiver would
understate what the dispatcher can do. It understands exactly what the benchmark sends —
keep-alive requests framed by ``Content-Length`` — and nothing more. Not a general server;
never expose it beyond loopback.

Paths: ``/ok/<tag>/…`` answers 200 and counts; ``/lat/<tag>/…`` also records arrival minus
the ``bench_t`` insert time carried in the JSON body (same host clock); ``/hole/<tag>/…``
reads the request and never answers (a blackholed endpoint). ``GET /_stats`` returns the
counters per tag as JSON. Run: ``python -m dispatcher.bench.receiver``; it prints its port on
the first stdout line and exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import typing

import orjson

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_BENCH_T = b'"bench_t":'


class Tag:
    __slots__ = ("count", "first", "last", "latencies")

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies: list[float] = []

    def hit(self, now: float) -> None:
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now

    def as_dict(self) -> dict[str, object]:
        return {
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "latencies": self.latencies,
        }


class Stats:
    def __init__(self) -> None:
        self.tags: dict[bytes, Tag] = {}

    def tag(self, name: bytes) -> Tag:
        t = self.tags.get(name)
        if t is None:
            t = self.tags[name] = Tag()
        return t


def bench_time(body: bytes) -> float | None:
    """The ``bench_t`` number in a JSON body, without parsing the whole document."""
    at = body.find(_BENCH_T)
    if at < 0:
        return None
    start = at + len(_BENCH_T)
    end = start
    while end < len(body) and body[end] not in b",}":
        end += 1
    try:
        return float(body[start:end])
    except ValueError:
        return None


class HookProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            at = head.lower().find(b"\r\ncontent-length:")
            length = 0
            if at >= 0:
                stop = head.find(b"\r", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            self._request(head, body)

    def _request(self, head: bytes, body: bytes) -> None:
        now = time.time()
        transport = self._transport
        assert transport is not None
        line_end = head.find(b"\r\n")
        parts = head[: line_end if line_end >= 0 else len(head)].split(b" ")
        path = parts[1] if len(parts) > 1 else b"/"
        segments = path.split(b"/")
        kind = segments[1] if len(segments) > 1 else b""
        tag = segments[2] if len(segments) > 2 else b""
        if kind == b"ok":
            self._stats.tag(tag).hit(now)
            transport.write(_OK)
        elif kind == b"lat":
            t = self._stats.tag(tag)
            t.hit(now)
            sent = bench_time(body)
            if sent is not None:
                t.latencies.append(now - sent)
            transport.write(_OK)
        elif kind == b"hole":
            self._stats.tag(tag).hit(now)  # and never answer: the client's timeout ends it
        elif kind == b"_stats":
            out = orjson.dumps({k.decode(): v.as_dict() for k, v in self._stats.tags.items()})
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(out)).encode()
                + b"\r\n\r\n"
                + out
            )
        else:
            transport.write(_NOT_FOUND)


async def serve(host: str = "127.0.0.1", port: int = 0) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(lambda: HookProtocol(stats), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{bound}\n")
    sys.stdout.flush()
    # Exit when the parent goes away (stdin closes), so a crashed benchmark leaves nothing.
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop  # noqa: PLC0415
        except ImportError:
            asyncio.run(serve())
        else:
            uvloop.run(serve())


if __name__ == "__main__":
    main()
