"""The HTTP sender against aioresponses (unit level: no sockets): request shape, signatures,
outcome classification, and exceptions mapped to outcomes."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import standardwebhooks

from dispatcher import model, signing
from dispatcher import sender as http_sender
from tests.unit.aioresponses_shim import mocked

URL = "http://receiver.test/hook"
SECRET = signing.generate_secret()


def _job(**kw: Any) -> model.Job:
    base: dict[str, Any] = {
        "delivery_id": 1,
        "lease_token": 7,
        "attempt": 1,
        "subscription_id": "s",
        "url": URL,
        "event_id": "evt_1",
        "event_type": "a.b",
        "body": b'{"a": 1}',
        "secrets": (SECRET,),
        "signature_header": "X-AgentX-Signature",
        "signers": (),
        "headers": {"X-Tenant": "t1"},
        "event_created_at": 0.0,
    }
    base.update(kw)
    return model.Job(**base)


@pytest.fixture
async def sender() -> AsyncIterator[http_sender.Sender]:
    session = http_sender.build_session(max_connections=4)
    yield http_sender.Sender(
        session,
        signing.SignerRegistry.load(),
        request_timeout_seconds=2,
        connect_timeout_seconds=1,
        response_max_bytes=1024,
        response_log_bytes=16,
        clock=lambda: 1_700_000_000.0,
        direct=False,  # aioresponses mocks ClientSession's path; sockets test the direct one
    )
    await session.close()


async def test_request_carries_body_and_both_signatures(sender: http_sender.Sender) -> None:
    with mocked() as m:
        m.post(URL, status=204)
        result = await sender.send(_job())
        [(key, calls)] = list(m.requests.items())
    assert key[0] == "POST"
    call = calls[0]
    headers = call.kwargs["headers"]
    body = call.kwargs["data"]
    assert body == b'{"a": 1}'
    assert call.kwargs["allow_redirects"] is False
    assert headers["content-type"] == "application/json"
    assert headers["X-Tenant"] == "t1"
    assert headers["webhook-timestamp"] == "1700000000"
    wh = standardwebhooks.Webhook(SECRET)
    # The library rejects old timestamps; check the signature itself.
    expected = wh.sign("evt_1", _dt(1_700_000_000), body.decode())
    assert headers["webhook-signature"] == expected
    assert (
        headers["X-AgentX-Signature"]
        == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    )
    assert result.verdict is model.Verdict.DELIVERED
    assert result.outcome is model.Outcome.SUCCESS


def _dt(ts: int) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, tz=UTC)


async def test_custom_headers_cannot_override_signatures(sender: http_sender.Sender) -> None:
    with mocked() as m:
        m.post(URL, status=200)
        await sender.send(_job(headers={"webhook-signature": "forged", "Content-Type": "x"}))
        call = next(iter(m.requests.values()))[0]
    assert call.kwargs["headers"]["webhook-signature"].startswith("v1,")
    assert call.kwargs["headers"]["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("status", "verdict", "outcome"),
    [
        (200, model.Verdict.DELIVERED, model.Outcome.SUCCESS),
        (299, model.Verdict.DELIVERED, model.Outcome.SUCCESS),
        (301, model.Verdict.PERMANENT, model.Outcome.OTHER),
        (400, model.Verdict.PERMANENT, model.Outcome.HTTP_4XX),
        (404, model.Verdict.PERMANENT, model.Outcome.HTTP_4XX),
        (408, model.Verdict.RETRYABLE, model.Outcome.HTTP_4XX),
        (410, model.Verdict.GONE, model.Outcome.HTTP_4XX),
        (429, model.Verdict.RETRYABLE, model.Outcome.HTTP_429),
        (500, model.Verdict.RETRYABLE, model.Outcome.HTTP_5XX),
        (503, model.Verdict.RETRYABLE, model.Outcome.HTTP_5XX),
    ],
)
async def test_status_classification(
    sender: http_sender.Sender, status: int, verdict: model.Verdict, outcome: model.Outcome
) -> None:
    with mocked() as m:
        m.post(URL, status=status, body="x" * 100)
        result = await sender.send(_job())
    assert (result.verdict, result.outcome, result.status) == (verdict, outcome, status)
    assert result.response_excerpt == "x" * 16  # truncated to response_log_bytes


async def test_retry_after_is_parsed(sender: http_sender.Sender) -> None:
    with mocked() as m:
        m.post(URL, status=429, headers={"Retry-After": "120"})
        result = await sender.send(_job())
    assert result.retry_after_seconds == 120


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (TimeoutError(), model.Outcome.TIMEOUT),
        (aiohttp.ServerTimeoutError("read"), model.Outcome.TIMEOUT),
        (aiohttp.ServerDisconnectedError(), model.Outcome.CONNECT_ERROR),
        (aiohttp.ClientPayloadError("bad"), model.Outcome.OTHER),
    ],
)
async def test_exceptions_map_to_retryable_outcomes(
    sender: http_sender.Sender, exc: Exception, outcome: model.Outcome
) -> None:
    with mocked() as m:
        m.post(URL, exception=exc)
        result = await sender.send(_job())
    assert result.verdict is model.Verdict.RETRYABLE
    assert result.outcome is outcome
    assert result.error


async def test_rotation_signs_with_every_valid_secret(sender: http_sender.Sender) -> None:
    old, new = signing.generate_secret(), signing.generate_secret()
    with mocked() as m:
        m.post(URL, status=200)
        await sender.send(_job(secrets=(new, old)))
        call = next(iter(m.requests.values()))[0]
    sigs = call.kwargs["headers"]["webhook-signature"].split(" ")
    assert len(sigs) == 2
    for secret, sig in zip((new, old), sigs, strict=True):
        assert (
            standardwebhooks.Webhook(secret).sign(
                "evt_1", _dt(1_700_000_000), call.kwargs["data"].decode()
            )
            == sig
        )
    # The body HMAC carries the current secret only.
    assert (
        call.kwargs["headers"]["X-AgentX-Signature"]
        == "sha256=" + hmac.new(new.encode(), call.kwargs["data"], hashlib.sha256).hexdigest()
    )


async def test_guard_refusal_is_blocked_not_retried(sender: http_sender.Sender) -> None:
    class Refused(Exception):
        pass

    def guard(_url: str) -> None:
        raise Refused("no")

    session = http_sender.build_session(max_connections=1)
    guarded = http_sender.Sender(
        session,
        signing.SignerRegistry.load(),
        request_timeout_seconds=1,
        connect_timeout_seconds=1,
        response_max_bytes=10,
        response_log_bytes=10,
        guard=guard,
        is_blocked=lambda e: isinstance(e, Refused),
        direct=False,
    )
    try:
        result = await guarded.send(_job())
    finally:
        await session.close()
    assert result.verdict is model.Verdict.BLOCKED
    assert result.outcome is model.Outcome.BLOCKED


@pytest.mark.parametrize(
    ("name", "value", "refused"),
    [
        ("X-Tenant", "acme é", False),
        ("X-Tenant", "tab\tinside", False),
        ("X-Tenant", "a\n", True),
        ("X-Tenant", "a\r\nInjected: 1", True),
        ("X-Tenant", "a\x0bb", True),
        ("X-Tenant", "a\x7f", True),
        ("X-Tenant", "a\x00", True),
        ("X Tenant", "v", True),
        ("X-Tenant\n", "v", True),
        ("", "v", True),
    ],
)
def test_header_problem_matches_what_http_refuses(name: str, value: str, refused: bool) -> None:
    problem = http_sender.header_problem(name, value)
    assert (problem is not None) == refused
    if problem is not None:
        assert value not in problem or not value
