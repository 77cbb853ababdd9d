"""The chaos receiver: one aiohttp server, one behaviour per path, every request logged.

``/r/<name>`` answers per ``modes[name]`` (a ``Mode``, or a callable taking the request
number for that name and returning one). Behaviours: ok, status codes (with headers such as
Retry-After), flaky, down (connection dropped), blackhole (never answers), slow headers,
trickling body, huge body, gzip bomb, redirect. Concurrency is counted per name. Loopback only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import random
import time
from collections.abc import Callable

from aiohttp import web


@dataclasses.dataclass(frozen=True)
class Mode:
    kind: str = "ok"  # ok | status | down | blackhole | slow | trickle | huge | gzip | redirect
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    size: int = 0
    location: str = ""


OK = Mode()
DOWN = Mode("down")
BLACKHOLE = Mode("blackhole")


def status(code: int, **headers: str) -> Mode:
    return Mode(
        "status", status=code, headers=tuple((k.replace("_", "-"), v) for k, v in headers.items())
    )


def flaky(p_fail: float, seed: int = 0) -> Callable[[int], Mode]:
    rng = random.Random(seed)
    return lambda _n: status(503) if rng.random() < p_fail else OK


@dataclasses.dataclass
class Entry:
    name: str
    webhook_id: str
    body: bytes
    # -1: received but never answered (client gone, blackhole, trickle): the receiver may
    # have acted on it. -2: refused by the receiver on purpose (down), so never processed.
    status: int
    at: float
    number: int
    headers: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)


_BOMB_CHUNK = gzip.compress(b"\0" * (1 << 20), compresslevel=9)  # 1 MiB of zeros, ~1 KiB


class ChaosReceiver:
    def __init__(self) -> None:
        self.modes: dict[str, Mode | Callable[[int], Mode]] = {}
        self.log: list[Entry] = []
        self.counts: dict[str, int] = {}
        self.concurrent: dict[str, int] = {}
        self.max_concurrent: dict[str, int] = {}
        self.bytes_sent = 0
        self._runner: web.AppRunner | None = None
        self._hold = asyncio.Event()  # blackholes wait on this until stop()
        self.port = 0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/r/{name}"

    async def start(self) -> ChaosReceiver:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/r/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._hold.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def ok(self, name: str | None = None) -> list[Entry]:
        return [e for e in self.log if 200 <= e.status < 300 and (name is None or e.name == name)]

    def entries(self, name: str) -> list[Entry]:
        return [e for e in self.log if e.name == name]

    def _mode(self, name: str) -> tuple[Mode, int]:
        n = self.counts.get(name, 0)
        self.counts[name] = n + 1
        mode = self.modes.get(name, OK)
        return (mode(n) if callable(mode) else mode), n

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = await request.read()
        mode, number = self._mode(name)
        headers = {k.lower(): v for k, v in request.headers.items()}
        entry = Entry(name, headers.get("webhook-id", ""), body, -1, time.time(), number, headers)
        self.log.append(entry)
        self.concurrent[name] = self.concurrent.get(name, 0) + 1
        self.max_concurrent[name] = max(self.max_concurrent.get(name, 0), self.concurrent[name])
        try:
            return await self._answer(request, mode, entry)
        finally:
            self.concurrent[name] -= 1

    async def _answer(self, request: web.Request, mode: Mode, entry: Entry) -> web.StreamResponse:
        kind = mode.kind
        if kind == "down":
            entry.status = -2
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError  # nothing more to do for this connection
        if kind == "blackhole":
            await self._hold.wait()
            raise asyncio.CancelledError
        if kind == "slow":
            await asyncio.sleep(mode.delay)  # the scenario's slow endpoint
        if kind in ("ok", "slow"):
            entry.status = 200
            return web.Response(status=200, text="ok")
        if kind == "status":
            entry.status = mode.status
            return web.Response(status=mode.status, headers=dict(mode.headers), text="no")
        if kind == "redirect":
            entry.status = 302
            return web.Response(status=302, headers={"Location": mode.location})
        response = web.StreamResponse(status=200)
        if kind == "gzip":
            response.headers["Content-Encoding"] = "gzip"
        response.headers["Content-Type"] = "application/octet-stream"
        # A trickle never finishes its answer: the dispatcher times out, so it is no receipt.
        entry.status = -1 if kind == "trickle" else 200
        await response.prepare(request)
        return await self._stream(response, mode)

    async def _stream(self, response: web.StreamResponse, mode: Mode) -> web.StreamResponse:
        try:
            if mode.kind == "trickle":
                while True:  # one byte per delay, forever: only the total deadline ends it
                    await response.write(b".")
                    self.bytes_sent += 1
                    await asyncio.sleep(mode.delay)
            chunk = _BOMB_CHUNK if mode.kind == "gzip" else b"x" * 65536
            sent = 0
            while sent < mode.size:
                await response.write(chunk)
                sent += len(chunk)
                self.bytes_sent += len(chunk)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up after its cap: the point of the scenario
        return response


async def start() -> ChaosReceiver:
    return await ChaosReceiver().start()
