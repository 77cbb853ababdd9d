"""Test helpers shared by every suite: waiting with a deadline, DSN surgery, a real receiver,
the CLI as a subprocess.

Nothing here sleeps to wait for a condition: ``wait_for`` polls a predicate until a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp.abc
import asyncpg
import orjson
from aiohttp import web

import dispatcher
from dispatcher import app, model
from dispatcher.db import repository
from tests import leaks

ROOT = Path(__file__).resolve().parent.parent


async def wait_for(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)  # poll interval, not a wait for the condition itself


# The signing secret of the subscriptions tests create (any valid whsec_ value would do).
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def subscribe(
    pool: Any,
    url: str = "http://127.0.0.1:9/hook",
    *,
    event_types: Sequence[str] = ("*",),
    secret: str = SECRET,
    **fields: Any,
) -> str:
    """Create a subscription through the repository; return its id."""
    sub = await repository.Repository(pool).create_subscription(
        url=url, event_types=list(event_types), secret=secret, **fields
    )
    return str(sub["id"])


def ack(
    job: model.Job, state: model.DeliveryState = model.DeliveryState.DELIVERED, **fields: Any
) -> model.Ack:
    """A successful attempt's result for ``job`` (``fields`` override any of its values)."""
    values: dict[str, Any] = {
        "delivery_id": job.delivery_id,
        "lease_token": job.lease_token,
        "attempt": job.attempt,
        "state": state,
        "delay_seconds": None,
        "status": 200,
        "error": None,
        "started_at": 0.0,
        "duration_ms": 1.0,
        "outcome": "success",
        "response": "ok",
    }
    values.update(fields)
    return model.Ack(**values)


async def publish(
    pool: Any,
    n: int = 1,
    *,
    event_type: str = "e.x",
    payload: Callable[[int], Any] = lambda i: {"i": i},
    **kw: Any,
) -> list[str]:
    """Publish ``n`` events in one transaction through ``dispatcher.publish``; their ids."""
    async with pool.acquire() as conn, conn.transaction():
        return [await dispatcher.publish(conn, event_type, payload(i), **kw) for i in range(n)]


def with_database(dsn: str, name: str) -> str:
    """The same server, another database."""
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


@dataclasses.dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int


class Receiver:
    """A real aiohttp server on 127.0.0.1 that records requests and answers per a script.

    ``respond(request_number, headers, body) -> (status, headers, delay_seconds)`` decides each
    answer; it defaults to 200. Concurrency is tracked so limits can be asserted."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        # With ``tls`` it serves HTTPS on 127.0.0.1; ``host`` is the name the URL uses.
        self._tls = tls
        self.host = host
        self.requests: list[Received] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self.respond: Callable[[int, dict[str, str], bytes], tuple[int, dict[str, str], float]] = (
            lambda _n, _h, _b: (200, {}, 0.0)
        )
        self.release = asyncio.Event()
        self.release.set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}/hook"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._tls)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            number = len(self.requests)
            status, extra, delay = self.respond(number, headers, body)
            self.requests.append(Received(request.path, headers, body, time.time(), status))
            await self.release.wait()
            if delay:
                await asyncio.sleep(delay)  # simulated slow receiver, part of the scenario
            return web.Response(status=status, headers=extra, text="ok" if status < 300 else "no")
        finally:
            self.concurrent -= 1

    def ids(self) -> list[str]:
        return [r.headers.get("webhook-id", "") for r in self.requests]

    def ok(self) -> list[Received]:
        return [r for r in self.requests if 200 <= r.status < 300]


def spawn_dispatcher(
    dsn: str,
    *,
    extra_env: dict[str, str] | None = None,
    args: Sequence[str] = ("run",),
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """The real CLI as a subprocess (``python -m dispatcher``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(
        {
            "DATABASE_URL": dsn,
            "DISPATCHER_LISTEN": "127.0.0.1:0",
            "DISPATCHER_POLL_INTERVAL": "0.05",
            "DISPATCHER_RETRY_BASE": "0.01",
            "DISPATCHER_RETRY_CAP": "0.05",
            "DISPATCHER_ALLOW_CIDRS": "127.0.0.1/32",
            "DISPATCHER_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra_env or {})
    if log_path:
        leaks.watch_file(log_path)
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "dispatcher", *args],
        env=env,
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


class StaticResolver(aiohttp.abc.AbstractResolver):
    """DNS for made-up names (name → addresses); an unknown name fails like NXDOMAIN. The SSRF
    guard wraps it and still judges every answer."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        self.asked.append(host)
        if host not in self.names:
            raise OSError(f"unknown name {host}")
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in self.names[host]
        ]

    async def close(self) -> None:
        return None


@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self
        return orjson.loads(self.out)


def cli_env(dsn: str, **extra: str) -> dict[str, str]:
    """This process's environment without DISPATCHER_* settings, pointed at ``dsn``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    return {**env, "DATABASE_URL": dsn, **extra}


async def run_cli(env: dict[str, str], *args: str) -> CliResult:
    """``python -m dispatcher ARGS`` as a real subprocess, with a deadline."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    leaks.check_cli(args, out.decode(), err.decode())
    return CliResult(proc.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def sql_ascii_database(server_dsn: str) -> AsyncIterator[str]:
    """A migrated database in SQL_ASCII, where a producer can store bytes that are not UTF-8
    (rows the client then cannot decode); dropped afterwards."""
    name = f"t_ascii_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' TEMPLATE template0 "
            "LC_COLLATE 'C' LC_CTYPE 'C'"
        )
        dsn = with_database(server_dsn, name)
        await app.migrate_database(dsn)
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
