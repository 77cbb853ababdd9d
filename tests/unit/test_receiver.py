"""The receiver toolkit against dispatcher's own signers, the independent ``standardwebhooks``
library and the seed article's body-HMAC snippet; the example app over real HTTP on
127.0.0.1. A Postgres idempotency test runs only when ``DATABASE_URL`` is set."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks.webhooks import Webhook

from dispatcher import receiver, signing
from dispatcher.examples import receiver as example

OLD = "whsec_" + base64.b64encode(b"old-secret-key-0123456789").decode()
NEW = "whsec_" + base64.b64encode(b"new-secret-key-0123456789").decode()
THIRD = "whsec_" + base64.b64encode(b"third-secret-key-01234567").decode()
HEADER = "X-AgentX-Signature"
BODY = json.dumps(
    {"event": "LEAD_QUALIFICATION_PROGRESS", "job_id": "lq-1", "status": "QUEUED"}
).encode()
NOW = 1_774_700_000


def dispatcher_headers(
    body: bytes = BODY,
    secrets: tuple[str, ...] = (NEW,),
    *,
    msg_id: str = "msg_1",
    timestamp: int = NOW,
    header_name: str | None = HEADER,
) -> dict[str, str]:
    """Headers exactly as dispatcher's sender signs them."""
    registry = signing.SignerRegistry.load()
    item = signing.SigningInput(msg_id, timestamp, body, secrets, header_name)
    return signing.sign(registry.for_subscription(header_name, ()), item)


def library_headers(secret: str, body: bytes, msg_id: str, timestamp: int) -> dict[str, str]:
    """Headers signed independently by the ``standardwebhooks`` library."""
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def seed_snippet_accepts(secret: str, raw_body: bytes, signature_header: str) -> bool:
    """The seed article's receiver, verbatim in substance."""
    expected = hmac.new(secret.encode("utf-8"), raw_body, hashlib.sha256).hexdigest()
    if signature_header.startswith("sha256="):
        signature_header = signature_header[len("sha256=") :]
    return hmac.compare_digest(expected, signature_header)


# --- Standard Webhooks -------------------------------------------------------------------


def test_dispatcher_signed_request_verifies() -> None:
    headers = dispatcher_headers()
    receiver.verify_standard(NEW, headers, BODY, now=NOW)
    verified = receiver.Verifier(NEW, signature_header=HEADER, clock=lambda: NOW).verify(
        headers, BODY
    )
    assert verified == receiver.Verified("msg_1", NOW, body_hmac=True)


def test_library_signed_request_verifies() -> None:
    headers = library_headers(NEW, BODY, "msg_lib", NOW)
    receiver.verify_standard(NEW, headers, BODY, now=NOW)
    receiver.verify_standard([THIRD, NEW], headers, BODY, now=NOW)


def test_toolkit_accepted_request_also_passes_library_and_seed_snippet() -> None:
    timestamp = int(time.time())
    headers = dispatcher_headers(timestamp=timestamp)
    receiver.Verifier(NEW, signature_header=HEADER).verify(headers, BODY)
    assert Webhook(NEW).verify(BODY, headers) == json.loads(BODY)
    assert seed_snippet_accepts(NEW, BODY, headers[HEADER])


def test_header_lookup_is_case_insensitive() -> None:
    headers = {k.upper(): v for k, v in dispatcher_headers().items()}
    receiver.Verifier(NEW, signature_header=HEADER.lower(), clock=lambda: NOW).verify(headers, BODY)


def test_rotation_either_side() -> None:
    headers = dispatcher_headers(secrets=(NEW, OLD), header_name=None)
    assert len(headers["webhook-signature"].split(" ")) == 2
    receiver.verify_standard(OLD, headers, BODY, now=NOW)
    receiver.verify_standard(NEW, headers, BODY, now=NOW)
    receiver.verify_standard([THIRD, OLD], headers, BODY, now=NOW)
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_standard(THIRD, headers, BODY, now=NOW)


def test_receiver_rotation_for_body_hmac() -> None:
    value = dispatcher_headers(secrets=(NEW, OLD))[HEADER]
    receiver.verify_body_hmac(NEW, value, BODY)
    receiver.verify_body_hmac([OLD, NEW], value, BODY)
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_body_hmac(OLD, value, BODY)  # body-HMAC signs with the current one only


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda h, b: (h, b + b" "), id="tampered-body"),
        pytest.param(lambda h, b: ({**h, "webhook-id": "msg_2"}, b), id="tampered-id"),
        pytest.param(lambda h, b: ({**h, "webhook-timestamp": str(NOW + 1)}, b), id="tampered-ts"),
    ],
)
def test_tampering_is_rejected(
    mutate: Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]],
) -> None:
    headers, body = mutate(dispatcher_headers(header_name=None), BODY)
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_standard(NEW, headers, body, now=NOW)


def test_tampered_body_fails_body_hmac() -> None:
    value = dispatcher_headers()[HEADER]
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_body_hmac(NEW, value, BODY + b" ")


def test_wrong_secret_is_rejected() -> None:
    headers = dispatcher_headers()
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_standard(OLD, headers, BODY, now=NOW)
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_body_hmac(OLD, headers[HEADER], BODY)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_missing_standard_headers(name: str, how: str) -> None:
    headers = dispatcher_headers(header_name=None)
    if how == "absent":
        del headers[name]
    else:
        headers[name] = ""
    with pytest.raises(receiver.MissingHeaderError, match=name):
        receiver.verify_standard(NEW, headers, BODY, now=NOW)


def test_missing_body_hmac_header_when_configured() -> None:
    headers = dispatcher_headers(header_name=None)
    verifier = receiver.Verifier(NEW, signature_header=HEADER, clock=lambda: NOW)
    with pytest.raises(receiver.MissingHeaderError):
        verifier.verify(headers, BODY)
    with pytest.raises(receiver.MissingHeaderError):
        receiver.verify_body_hmac(NEW, None, BODY)
    receiver.Verifier(NEW, clock=lambda: NOW).verify(headers, BODY)  # not configured: fine


@pytest.mark.parametrize(
    ("offset", "match"),
    [(-301, "too old"), (301, "too new"), (-86_400, "too old"), (10**6, "too new")],
)
def test_timestamp_outside_tolerance(offset: int, match: str) -> None:
    headers = dispatcher_headers(timestamp=NOW + offset, header_name=None)
    with pytest.raises(receiver.TimestampError, match=match):
        receiver.verify_standard(NEW, headers, BODY, now=NOW)


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_timestamp_within_tolerance(offset: int) -> None:
    headers = dispatcher_headers(timestamp=NOW + offset, header_name=None)
    receiver.verify_standard(NEW, headers, BODY, now=NOW)


def test_tolerance_is_configurable() -> None:
    headers = dispatcher_headers(timestamp=NOW - 60, header_name=None)
    with pytest.raises(receiver.TimestampError):
        receiver.verify_standard(NEW, headers, BODY, tolerance_seconds=30, now=NOW)


@pytest.mark.parametrize(
    "value", ["abc", "1.5e9", "-5", " 1774700000", "\uff11\uff12\uff13", "9" * 40]
)
def test_malformed_timestamp(value: str) -> None:
    headers = {**dispatcher_headers(header_name=None), "webhook-timestamp": value}
    with pytest.raises(receiver.TimestampError, match="unix seconds"):
        receiver.verify_standard(NEW, headers, BODY, now=NOW)


@pytest.mark.parametrize(
    "value",
    ["garbage", "v1,", "v1,!!!not-base64!!!", "v1,é", "v1a,AAAA", "v2," + "A" * 44, ","],
)
def test_malformed_signature_header(value: str) -> None:
    headers = {**dispatcher_headers(header_name=None), "webhook-signature": value}
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_standard(NEW, headers, BODY, now=NOW)


def test_unknown_entries_beside_a_valid_signature_are_skipped() -> None:
    headers = dispatcher_headers(header_name=None)
    headers["webhook-signature"] = "v1a,xyz garbage v1,%%% " + headers["webhook-signature"]
    receiver.verify_standard(NEW, headers, BODY, now=NOW)


@pytest.mark.parametrize(
    "value", ["", "sha1=abcd", "abcd", "sha256=", "sha256=zz", "sha256=ünï", "SHA256=00"]
)
def test_malformed_body_hmac_header(value: str) -> None:
    expected: type[receiver.VerificationError] = (
        receiver.MissingHeaderError if value == "" else receiver.InvalidSignatureError
    )
    with pytest.raises(expected):
        receiver.verify_body_hmac(NEW, value, BODY)


def test_exception_tree() -> None:
    for exc in (
        receiver.MissingHeaderError,
        receiver.InvalidSignatureError,
        receiver.TimestampError,
    ):
        assert issubclass(exc, receiver.VerificationError)
    assert issubclass(receiver.VerificationError, Exception)


def test_verifier_keeps_secrets_out_of_repr_and_rejects_bad_ones() -> None:
    verifier = receiver.Verifier([NEW, OLD], signature_header=HEADER)
    assert NEW not in repr(verifier)
    assert OLD not in repr(verifier)
    with pytest.raises(ValueError, match="base64"):
        receiver.Verifier("whsec_not base64!")
    with pytest.raises(ValueError, match="secret"):
        receiver.Verifier([])
    with pytest.raises(ValueError, match="secret"):
        receiver.verify_standard("", dispatcher_headers(), BODY, now=NOW)


# --- idempotency -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_store_remembers_and_forgets() -> None:
    store = receiver.MemoryIdempotencyStore()
    assert await store.seen_or_remember("a") is False
    assert await store.seen_or_remember("a") is True
    await store.forget("a")
    assert await store.seen_or_remember("a") is False


async def test_memory_store_is_bounded_lru() -> None:
    store = receiver.MemoryIdempotencyStore(max_entries=3)
    for key in "abc":
        assert await store.seen_or_remember(key) is False
    assert await store.seen_or_remember("a") is True  # touch: "b" is now the oldest
    assert await store.seen_or_remember("d") is False
    assert len(store) == 3
    assert "b" not in store
    assert "a" in store
    for i in range(1000):
        await store.seen_or_remember(f"id-{i}")
    assert len(store) == 3


async def test_memory_store_ttl_expiry() -> None:
    clock = FakeClock()
    store = receiver.MemoryIdempotencyStore(ttl_seconds=10, clock=clock)
    await store.seen_or_remember("a")
    clock.now += 5
    await store.seen_or_remember("b")
    clock.now += 5  # "a" expires exactly now
    assert await store.seen_or_remember("b") is True  # and "b" is refreshed
    assert "a" not in store
    assert await store.seen_or_remember("a") is False
    clock.now += 9.5
    assert await store.seen_or_remember("b") is True
    clock.now += 100
    assert await store.seen_or_remember("c") is False
    assert len(store) == 1


def test_memory_store_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        receiver.MemoryIdempotencyStore(max_entries=0)
    with pytest.raises(ValueError, match="ttl"):
        receiver.MemoryIdempotencyStore(ttl_seconds=0)


def test_postgres_store_rejects_unsafe_table_names() -> None:
    with pytest.raises(ValueError, match="identifier"):
        receiver.PostgresIdempotencyStore(None, table="receipts; DROP TABLE x")
    receiver.PostgresIdempotencyStore(None, table="app.webhook_receipts")


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


def fresh(body: bytes = BODY, *, msg_id: str = "msg_1", **kw: Any) -> dict[str, str]:
    return {
        **dispatcher_headers(body, msg_id=msg_id, timestamp=int(time.time()), **kw),
        "content-type": "application/json",
    }


async def test_app_valid_then_duplicate(make_client: ClientFactory) -> None:
    app = example.build_app(NEW)
    client = await make_client(app)
    headers = fresh()

    resp = await client.post("/webhooks", data=BODY, headers=headers)
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}

    resp = await client.post("/webhooks", data=BODY, headers=headers)
    assert resp.status == 200
    assert await resp.json() == {"status": "duplicate"}

    events = app[example.EVENTS]
    assert len(events) == 1
    assert events[0]["webhook_id"] == "msg_1"
    assert events[0]["event"] == json.loads(BODY)
    assert events[0]["verified"] == {"standard_webhooks": True, "body_hmac": True}
    assert "webhook-signature" not in events[0]["headers"]
    assert events[0]["headers"]["webhook-id"] == "msg_1"

    listed = await (await client.get("/events")).json()
    assert [e["webhook_id"] for e in listed] == ["msg_1"]


async def test_app_seed_path_and_library_signature(make_client: ClientFactory) -> None:
    app = example.build_app(NEW, signature_header=None)
    client = await make_client(app)
    headers = library_headers(NEW, BODY, "msg_lib", int(time.time()))
    resp = await client.post("/agent-callbacks/lead-status", data=BODY, headers=headers)
    assert resp.status == 200
    assert app[example.EVENTS][0]["verified"]["body_hmac"] is False


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        pytest.param(lambda: fresh(secrets=(OLD,)), "invalid_signature", id="wrong-secret"),
        pytest.param(
            lambda: {**fresh(), HEADER: "sha256=" + "0" * 64}, "invalid_signature", id="bad-hmac"
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
    app = example.build_app(NEW)
    client = await make_client(app)
    resp = await client.post("/webhooks", data=BODY, headers=headers())
    assert resp.status == 401
    text = await resp.text()
    assert json.loads(text)["error"] == code
    assert NEW not in text
    assert NEW.removeprefix("whsec_") not in text
    assert app[example.EVENTS] == []


async def test_app_tampered_body_is_401(make_client: ClientFactory) -> None:
    app = example.build_app(NEW)
    client = await make_client(app)
    resp = await client.post("/webhooks", data=BODY + b" ", headers=fresh())
    assert resp.status == 401
    assert app[example.EVENTS] == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe"])
async def test_app_malformed_json_with_valid_signature_is_400(
    make_client: ClientFactory, body: bytes
) -> None:
    app = example.build_app(NEW)
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

    app = example.build_app(NEW, on_event=flaky)
    client = await make_client(app)
    resp = await client.post("/webhooks", data=BODY, headers=fresh())
    assert resp.status == 500
    assert app[example.EVENTS] == []
    resp = await client.post("/webhooks", data=BODY, headers=fresh())
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    assert len(app[example.EVENTS]) == 1
    assert calls == 2


async def test_app_injected_failures(make_client: ClientFactory) -> None:
    app = example.build_app(NEW, fail_ratio=1.0)
    client = await make_client(app)
    resp = await client.post("/webhooks", data=BODY, headers=fresh())
    assert resp.status == 500
    assert app[example.EVENTS] == []
    assert app[example.STATS]["injected_failures"] == 1
    assert "msg_1" not in app[example.STORE]


async def test_app_fail_ratio_is_reproducible_with_seed(make_client: ClientFactory) -> None:
    async def statuses() -> list[int]:
        client = await make_client(example.build_app(NEW, fail_ratio=0.5, seed=7))
        out = []
        for i in range(20):
            headers = fresh(msg_id=f"msg_{i}")
            out.append((await client.post("/webhooks", data=BODY, headers=headers)).status)
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
        receiver.webhook_handler(receiver.Verifier(NEW), receiver.MemoryIdempotencyStore(), slow),
    )
    client = await make_client(app)
    headers = fresh(header_name=None)
    first = asyncio.create_task(client.post("/hook", data=BODY, headers=headers))
    await asyncio.wait_for(started.wait(), timeout=5)
    resp = await client.post("/hook", data=BODY, headers=headers)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    release.set()
    assert (await first).status == 200
    resp = await client.post("/hook", data=BODY, headers=headers)
    assert await resp.json() == {"status": "duplicate"}


def test_summary_line_has_type_and_status_only() -> None:
    payload = {"event": "LEAD_QUALIFICATION_COMPLETE", "status": "COMPLETE", "results": ["x@y"]}
    line = example.summary_line(payload, {"webhook-id": "msg_9"})
    assert line == "event webhook_id=msg_9 type=LEAD_QUALIFICATION_COMPLETE status=COMPLETE"


def test_build_app_rejects_bad_fail_ratio() -> None:
    with pytest.raises(ValueError, match="fail_ratio"):
        example.build_app(NEW, fail_ratio=1.5)


# --- exactly what was signed, and the boundaries --------------------------------------------


def test_zero_padded_timestamp_is_refused() -> None:
    """The signature covers the header's bytes; "0<ts>" was never signed."""
    headers = dispatcher_headers(header_name=None)
    headers["webhook-timestamp"] = "0" + headers["webhook-timestamp"]
    with pytest.raises(receiver.TimestampError, match="unix seconds"):
        receiver.verify_standard(NEW, headers, BODY, now=NOW)


@pytest.mark.parametrize("how", ["upper", "space_before", "space_after", "sha512"])
def test_body_hmac_accepts_only_the_exact_lower_case_form(how: str) -> None:
    good = dispatcher_headers()[HEADER]
    receiver.verify_body_hmac(NEW, good, BODY)
    digits = good.removeprefix("sha256=")
    value = {
        "upper": "sha256=" + digits.upper(),
        "space_before": "sha256= " + digits,
        "space_after": good + " ",
        "sha512": "sha512=" + digits,
    }[how]
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_body_hmac(NEW, value, BODY)


def test_signature_entry_needs_the_v1_comma_form() -> None:
    headers = dispatcher_headers(header_name=None)
    signature = headers["webhook-signature"]
    encoded = signature.removeprefix("v1,")
    for value in (encoded, "v1" + encoded, "v1;" + encoded, "v2," + encoded):
        with pytest.raises(receiver.InvalidSignatureError):
            receiver.verify_standard(NEW, {**headers, "webhook-signature": value}, BODY, now=NOW)


def test_verify_standard_uses_the_clock_when_now_is_omitted() -> None:
    receiver.verify_standard(NEW, dispatcher_headers(timestamp=int(time.time())), BODY)
    with pytest.raises(receiver.TimestampError, match="too old"):
        receiver.verify_standard(NEW, dispatcher_headers(timestamp=NOW - 10_000_000), BODY)


def test_plain_secret_verifies_the_body_hmac_and_needs_its_header() -> None:
    plain = "plain-text-secret-for-hmac"
    headers = dispatcher_headers(secrets=(plain,))
    assert "webhook-signature" not in headers
    verified = receiver.Verifier(plain, signature_header=HEADER, clock=lambda: NOW).verify(
        headers, BODY
    )
    assert verified == receiver.Verified("msg_1", NOW, body_hmac=True)
    with pytest.raises(ValueError, match="whsec_"):
        receiver.Verifier(plain)
    with pytest.raises(ValueError, match="whsec_"):
        receiver.verify_standard(plain, headers, BODY, now=NOW)


def _handler_app(
    process: Callable[[dict[str, Any], Mapping[str, str]], Awaitable[None]],
) -> web.Application:
    app = web.Application()
    app.router.add_post(
        "/hook",
        receiver.webhook_handler(
            receiver.Verifier(NEW), receiver.MemoryIdempotencyStore(), process
        ),
    )
    return app


async def test_handler_processes_each_distinct_id(make_client: ClientFactory) -> None:
    seen: list[str] = []

    async def record(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        seen.append(headers["webhook-id"])

    client = await make_client(_handler_app(record))
    for msg_id in ("msg_a", "msg_b", "msg_a"):
        resp = await client.post("/hook", data=BODY, headers=fresh(msg_id=msg_id, header_name=None))
        assert resp.status == 200
    assert seen == ["msg_a", "msg_b"]


async def test_handler_failure_answers_500_with_a_problem_body(
    make_client: ClientFactory,
) -> None:
    async def broken(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        raise RuntimeError("secret detail that must not leak")

    client = await make_client(_handler_app(broken))
    resp = await client.post("/hook", data=BODY, headers=fresh(header_name=None))
    assert resp.status == 500
    assert await resp.json() == {
        "error": "processing_failed",
        "detail": "the receiver could not process the event",
    }


def test_every_secret_must_be_a_non_empty_string() -> None:
    for bad in (["", NEW], [NEW, ""]):
        with pytest.raises(ValueError, match="secret"):
            receiver.Verifier(bad)


def test_a_stray_character_in_a_signature_is_not_skipped() -> None:
    headers = dispatcher_headers(header_name=None)
    encoded = headers["webhook-signature"].removeprefix("v1,")
    headers["webhook-signature"] = f"v1,{encoded[:10]}!{encoded[10:]}"
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_standard(NEW, headers, BODY, now=NOW)


def test_memory_store_bounds_at_their_edges() -> None:
    receiver.MemoryIdempotencyStore(max_entries=1, ttl_seconds=0.5)
    with pytest.raises(ValueError, match="max_entries"):
        receiver.MemoryIdempotencyStore(max_entries=0)
    with pytest.raises(ValueError, match="ttl_seconds"):
        receiver.MemoryIdempotencyStore(ttl_seconds=0)


async def test_forgetting_an_unknown_id_is_harmless() -> None:
    store = receiver.MemoryIdempotencyStore()
    await store.forget("never-seen")
    assert await store.begin("never-seen") is receiver.Claim.NEW


def test_postgres_store_settings() -> None:
    # No database needed to check what the constructor keeps (tests/integration uses it).
    store = receiver.PostgresIdempotencyStore(None, processing_seconds=0.5)  # type: ignore[arg-type]
    assert (store.table, store.processing_seconds) == ("webhook_receipts", 0.5)
    with pytest.raises(ValueError, match="processing_seconds"):
        receiver.PostgresIdempotencyStore(None, processing_seconds=0)  # type: ignore[arg-type]


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
    resp = await client.post("/hook", data=BODY, headers={"content-type": "application/json"})
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
    app.router.add_post("/hook", receiver.webhook_handler(receiver.Verifier(NEW), store, record))
    client = await make_client(app)
    busy = await client.post("/hook", data=BODY, headers=fresh(msg_id="msg_busy", header_name=None))
    assert (busy.status, await busy.json()) == (503, {"status": "in_progress"})
    assert busy.headers["Retry-After"] == "1"
    for expected in ({"status": "ok"}, {"status": "duplicate"}):
        resp = await client.post(
            "/hook", data=BODY, headers=fresh(msg_id="msg_x", header_name=None)
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
        "/hook", receiver.webhook_handler(receiver.Verifier(NEW), _OldStore(), flaky)
    )
    client = await make_client(app)
    headers = fresh(header_name=None)
    statuses = [(await client.post("/hook", data=BODY, headers=headers)).status for _ in range(3)]
    assert statuses == [500, 200, 200]
    resp = await client.post("/hook", data=BODY, headers=headers)
    assert await resp.json() == {"status": "duplicate"}
    assert calls == 2
