"""The receiver toolkit's aiohttp handler and the example receiver app over real HTTP on
127.0.0.1: verification, de-duplication, failure injection and retries as a sender sees them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dispatcher import receiver
from dispatcher.examples import receiver as example
from tests import signed

# --- aiohttp: webhook_handler and the example app --------------------------------------------

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(app: web.Application) -> TestClient[web.Request, web.Application]:
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def fresh(body: bytes = signed.BODY, *, msg_id: str = "msg_1", **kw: Any) -> dict[str, str]:
    return {
        **signed.dispatcher_headers(body, msg_id=msg_id, timestamp=int(time.time()), **kw),
        "content-type": "application/json",
    }


async def test_app_valid_then_duplicate(make_client: ClientFactory) -> None:
    app = example.build_app(signed.NEW)
    client = await make_client(app)
    headers = fresh()

    resp = await client.post("/webhooks", data=signed.BODY, headers=headers)
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}

    resp = await client.post("/webhooks", data=signed.BODY, headers=headers)
    assert resp.status == 200
    assert await resp.json() == {"status": "duplicate"}

    events = app[example.EVENTS]
    assert len(events) == 1
    assert events[0]["webhook_id"] == "msg_1"
    assert events[0]["event"] == json.loads(signed.BODY)
    assert events[0]["verified"] == {"standard_webhooks": True, "body_hmac": True}
    assert "webhook-signature" not in events[0]["headers"]
    assert events[0]["headers"]["webhook-id"] == "msg_1"

    listed = await (await client.get("/events")).json()
    assert [e["webhook_id"] for e in listed] == ["msg_1"]


async def test_app_seed_path_and_library_signature(make_client: ClientFactory) -> None:
    app = example.build_app(signed.NEW, signature_header=None)
    client = await make_client(app)
    headers = signed.library_headers(signed.NEW, signed.BODY, "msg_lib", int(time.time()))
    resp = await client.post("/agent-callbacks/lead-status", data=signed.BODY, headers=headers)
    assert resp.status == 200
    assert app[example.EVENTS][0]["verified"]["body_hmac"] is False


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        pytest.param(lambda: fresh(secrets=(signed.OLD,)), "invalid_signature", id="wrong-secret"),
        pytest.param(
            lambda: {**fresh(), signed.HEADER: "sha256=" + "0" * 64},
            "invalid_signature",
            id="bad-hmac",
        ),
        pytest.param(lambda: fresh(header_name=None), "missing_header", id="no-hmac-header"),
        pytest.param(
            lambda: {k: v for k, v in fresh().items() if k != "webhook-id"},
            "missing_header",
            id="no-id",
        ),
        pytest.param(
            lambda: {**fresh(), "webhook-timestamp": str(int(time.time()) - 3600)},
            "timestamp",
            id="old",
        ),
    ],
)
async def test_app_rejects_unverified(
    make_client: ClientFactory, headers: Callable[[], dict[str, str]], code: str
) -> None:
    app = example.build_app(signed.NEW)
    client = await make_client(app)
    resp = await client.post("/webhooks", data=signed.BODY, headers=headers())
    assert resp.status == 401
    text = await resp.text()
    assert json.loads(text)["error"] == code
    assert signed.NEW not in text
    assert signed.NEW.removeprefix("whsec_") not in text
    assert app[example.EVENTS] == []


async def test_app_tampered_body_is_401(make_client: ClientFactory) -> None:
    app = example.build_app(signed.NEW)
    client = await make_client(app)
    resp = await client.post("/webhooks", data=signed.BODY + b" ", headers=fresh())
    assert resp.status == 401
    assert app[example.EVENTS] == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe"])
async def test_app_malformed_json_with_valid_signature_is_400(
    make_client: ClientFactory, body: bytes
) -> None:
    app = example.build_app(signed.NEW)
    client = await make_client(app)
    resp = await client.post("/webhooks", data=body, headers=fresh(body))
    assert resp.status == 400
    assert app[example.EVENTS] == []
    # The id was not remembered, so a corrected redelivery would still be processed.
    assert "msg_1" not in app[example.STORE]


async def test_app_processing_failure_is_500_and_retry_is_processed(
    make_client: ClientFactory,
) -> None:
    calls = 0

    async def flaky(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("downstream unavailable")

    app = example.build_app(signed.NEW, on_event=flaky)
    client = await make_client(app)
    resp = await client.post("/webhooks", data=signed.BODY, headers=fresh())
    assert resp.status == 500
    assert app[example.EVENTS] == []
    resp = await client.post("/webhooks", data=signed.BODY, headers=fresh())
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    assert len(app[example.EVENTS]) == 1
    assert calls == 2


async def test_app_injected_failures(make_client: ClientFactory) -> None:
    app = example.build_app(signed.NEW, fail_ratio=1.0)
    client = await make_client(app)
    resp = await client.post("/webhooks", data=signed.BODY, headers=fresh())
    assert resp.status == 500
    assert app[example.EVENTS] == []
    assert app[example.STATS]["injected_failures"] == 1
    assert "msg_1" not in app[example.STORE]


async def test_app_fail_ratio_is_reproducible_with_seed(make_client: ClientFactory) -> None:
    async def statuses() -> list[int]:
        client = await make_client(example.build_app(signed.NEW, fail_ratio=0.5, seed=7))
        out = []
        for i in range(20):
            headers = fresh(msg_id=f"msg_{i}")
            out.append((await client.post("/webhooks", data=signed.BODY, headers=headers)).status)
        return out

    first, second = await statuses(), await statuses()
    assert first == second
    assert set(first) == {200, 500}


async def test_handler_answers_retryable_503_while_the_same_id_is_in_progress(
    make_client: ClientFactory,
) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        started.set()
        await release.wait()

    app = web.Application()
    app.router.add_post(
        "/hook",
        receiver.webhook_handler(
            receiver.Verifier(signed.NEW), receiver.MemoryIdempotencyStore(), slow
        ),
    )
    client = await make_client(app)
    headers = fresh(header_name=None)
    first = asyncio.create_task(client.post("/hook", data=signed.BODY, headers=headers))
    await asyncio.wait_for(started.wait(), timeout=5)
    resp = await client.post("/hook", data=signed.BODY, headers=headers)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    release.set()
    assert (await first).status == 200
    resp = await client.post("/hook", data=signed.BODY, headers=headers)
    assert await resp.json() == {"status": "duplicate"}
