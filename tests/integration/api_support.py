"""Helpers for the admin API tests: a running dispatcher with a token and a small client.

Import ``api`` into a test module to use it as a fixture."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

TOKEN = "test-admin-token-0123456789"


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


class Client:
    """Talks to one dispatcher's admin listener; ``token=None`` sends no Authorization."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str | None = TOKEN):
        self.session = session
        self.base = base
        self.token = token

    def with_token(self, token: str | None) -> Client:
        return Client(self.session, self.base, token)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        headers = {}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data = raw if raw is not None else (None if body is None else orjson.dumps(body))
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.session.request(
            method, self.base + path, data=data, headers=headers, params=params
        ) as resp:
            content = await resp.read()
            parsed = orjson.loads(content) if content else None
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, parsed)

    async def get(self, path: str, **params: str) -> Reply:
        return await self.call("GET", path, params=params or None)

    async def post(self, path: str, body: Any = None) -> Reply:
        return await self.call("POST", path, body)

    async def patch(self, path: str, body: Any = None) -> Reply:
        return await self.call("PATCH", path, body)

    async def delete(self, path: str) -> Reply:
        return await self.call("DELETE", path)


def problem(reply: Reply, status: int, code: str, field: str | None = None) -> None:
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/problem+json"), reply.headers
    assert reply.body["code"] == code, reply.body
    assert reply.body["status"] == status
    if field is not None:
        assert reply.body["field"] == field, reply.body


@pytest.fixture
async def api(start_dispatcher: Any) -> AsyncIterator[Client]:
    """A dispatcher with an admin token, and a client holding that token."""
    running = await start_dispatcher(admin_token=TOKEN)
    async with aiohttp.ClientSession() as session:
        yield Client(session, f"http://127.0.0.1:{running.dispatcher.bound_port}/v1")
