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


# --- handler boundaries and idempotency stores ---------------------------------------------


def _handler_app(
    process: Callable[[dict[str, Any], Mapping[str, str]], Awaitable[None]],
) -> web.Application:
    app = web.Application()
    app.router.add_post(
        "/hook",
        receiver.webhook_handler(
            receiver.Verifier(signed.NEW), receiver.MemoryIdempotencyStore(), process
        ),
    )
    return app


async def test_handler_processes_each_distinct_id(make_client: ClientFactory) -> None:
    seen: list[str] = []

    async def record(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        seen.append(headers["webhook-id"])

    client = await make_client(_handler_app(record))
    for msg_id in ("msg_a", "msg_b", "msg_a"):
        resp = await client.post(
            "/hook", data=signed.BODY, headers=fresh(msg_id=msg_id, header_name=None)
        )
        assert resp.status == 200
    assert seen == ["msg_a", "msg_b"]


async def test_handler_failure_answers_500_with_a_problem_body(
    make_client: ClientFactory,
) -> None:
    async def broken(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        raise RuntimeError("secret detail that must not leak")

    client = await make_client(_handler_app(broken))
    resp = await client.post("/hook", data=signed.BODY, headers=fresh(header_name=None))
    assert resp.status == 500
    assert await resp.json() == {
        "error": "processing_failed",
        "detail": "the receiver could not process the event",
    }


async def test_handler_bodies_for_bad_input(make_client: ClientFactory) -> None:
    async def never(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        raise AssertionError("must not be called")

    client = await make_client(_handler_app(never))
    resp = await client.post(
        "/hook", data=b"not json", headers=fresh(b"not json", header_name=None)
    )
    assert (resp.status, await resp.json()) == (
        400,
        {"error": "malformed_json", "detail": "body is not valid JSON"},
    )
    resp = await client.post("/hook", data=b"[1]", headers=fresh(b"[1]", header_name=None))
    assert (resp.status, await resp.json()) == (
        400,
        {"error": "malformed_json", "detail": "body is not a JSON object"},
    )
    resp = await client.post(
        "/hook", data=signed.BODY, headers={"content-type": "application/json"}
    )
    body = await resp.json()
    assert (resp.status, body["error"]) == (401, "missing_header")
    assert isinstance(body["detail"], str)
    assert body["detail"]


class _SharedStore:
    """A store that another process also writes to: it says what is in progress there."""

    def __init__(self, running_elsewhere: set[str]) -> None:
        self.running_elsewhere = running_elsewhere
        self.done: set[str] = set()

    async def begin(self, webhook_id: str) -> receiver.Claim:
        if webhook_id in self.running_elsewhere:
            return receiver.Claim.IN_PROGRESS
        return receiver.Claim.DONE if webhook_id in self.done else receiver.Claim.NEW

    async def finish(self, webhook_id: str) -> None:
        self.done.add(webhook_id)

    async def seen_or_remember(self, webhook_id: str) -> bool:
        raise AssertionError("a store with begin() is asked through begin()")

    async def forget(self, webhook_id: str) -> None:
        self.done.discard(webhook_id)


class _OldStore:
    """A custom store written against the older protocol: seen_or_remember and forget only."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def seen_or_remember(self, webhook_id: str) -> bool:
        seen = webhook_id in self.seen
        self.seen.add(webhook_id)
        return seen

    async def forget(self, webhook_id: str) -> None:
        self.seen.discard(webhook_id)


async def test_handler_lets_a_shared_store_decide(make_client: ClientFactory) -> None:
    processed: list[str] = []

    async def record(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        processed.append(headers["webhook-id"])

    store = _SharedStore({"msg_busy"})
    app = web.Application()
    app.router.add_post(
        "/hook", receiver.webhook_handler(receiver.Verifier(signed.NEW), store, record)
    )
    client = await make_client(app)
    busy = await client.post(
        "/hook", data=signed.BODY, headers=fresh(msg_id="msg_busy", header_name=None)
    )
    assert (busy.status, await busy.json()) == (503, {"status": "in_progress"})
    assert busy.headers["Retry-After"] == "1"
    for expected in ({"status": "ok"}, {"status": "duplicate"}):
        resp = await client.post(
            "/hook", data=signed.BODY, headers=fresh(msg_id="msg_x", header_name=None)
        )
        assert await resp.json() == expected
    assert processed == ["msg_x"]
    assert store.done == {"msg_x"}


async def test_handler_still_works_with_an_older_store(make_client: ClientFactory) -> None:
    calls = 0

    async def flaky(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first try fails")

    app = web.Application()
    app.router.add_post(
        "/hook", receiver.webhook_handler(receiver.Verifier(signed.NEW), _OldStore(), flaky)
    )
    client = await make_client(app)
    headers = fresh(header_name=None)
    statuses = [
        (await client.post("/hook", data=signed.BODY, headers=headers)).status for _ in range(3)
    ]
    assert statuses == [500, 200, 200]
    resp = await client.post("/hook", data=signed.BODY, headers=headers)
    assert await resp.json() == {"status": "duplicate"}
    assert calls == 2
