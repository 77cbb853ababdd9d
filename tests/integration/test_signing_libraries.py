"""One rule for secrets, checked against the public libraries on real deliveries.

A ``whsec_<base64>`` secret signs the Standard Webhooks headers (verified by ``svix`` and
``standardwebhooks``) and, with a signature header, the body HMAC keyed with the whole string.
Any other secret signs only the body-HMAC header, so it is refused at creation (admin API and
CLI), at rotation and when its header is removed, unless that header is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

import pytest
import standardwebhooks
import structlog
import svix.webhooks

import dispatcher
from dispatcher import cli
from tests import support
from tests.integration.api_support import Client, api, problem

__all__ = ["api"]

OLD = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW = "whsec_" + "C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
PLAIN = "plain-text-secret-for-hmac"
# Plain text that is also valid base64: it must not silently become a different HMAC key.
PLAIN_BASE64 = "QUJDREVGR0hJSktMTU5PUA=="


async def _publish(pool: Any) -> None:
    async with pool.acquire() as conn:
        await dispatcher.publish(conn, "t.x", {"n": 1, "text": "héllo"})


def _standard_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}


async def test_whsec_secret_verifies_with_svix_standardwebhooks_and_body_hmac(
    api: Client, pool: Any, receiver: support.Receiver
) -> None:
    created = await api.post(
        "/subscriptions",
        {
            "url": receiver.url,
            "event_types": ["t.*"],
            "secret": OLD,
            "signature_header": "X-Signature",
        },
    )
    assert created.status == 201, created
    # Rotate: during the grace period both secrets sign, and either verifies.
    rotated = await api.post(
        f"/subscriptions/{created.body['id']}/rotate-secret",
        {"secret": NEW, "grace_period_seconds": 3600},
    )
    assert rotated.status == 200, rotated
    await _publish(pool)
    await support.wait_for(receiver.ok, message="a delivery")
    req = receiver.requests[0]
    for secret in (OLD, NEW):
        assert standardwebhooks.Webhook(secret).verify(
            req.body, _standard_headers(req.headers)
        ) == {"n": 1, "text": "héllo"}
        svix.webhooks.Webhook(secret).verify(req.body, _standard_headers(req.headers))
    # The body HMAC is keyed with the whole current string, as a plain hmac receiver does.
    expected = hmac.new(NEW.encode(), req.body, hashlib.sha256).hexdigest()
    assert req.headers["x-signature"] == "sha256=" + expected


@pytest.mark.parametrize("secret", [PLAIN, PLAIN_BASE64])
async def test_plain_secret_signs_only_the_body_hmac_header(
    api: Client, pool: Any, receiver: support.Receiver, secret: str
) -> None:
    created = await api.post(
        "/subscriptions",
        {
            "url": receiver.url,
            "event_types": ["t.*"],
            "secret": secret,
            "signature_header": "X-Signature",
        },
    )
    assert created.status == 201, created
    await _publish(pool)
    await support.wait_for(receiver.ok, message="a delivery")
    req = receiver.requests[0]
    expected = hmac.new(secret.encode(), req.body, hashlib.sha256).hexdigest()
    assert req.headers["x-signature"] == "sha256=" + expected
    # Still identified (receivers de-duplicate on it), but no signature a library would fail.
    assert req.headers["webhook-id"].startswith("evt_")
    assert "webhook-signature" not in req.headers


async def test_plain_secret_without_a_signature_header_is_refused_everywhere(
    api: Client, pool: Any, receiver: support.Receiver, dsn: str, capsys: Any
) -> None:
    reply = await api.post(
        "/subscriptions", {"url": receiver.url, "event_types": ["t.*"], "secret": PLAIN}
    )
    problem(reply, 400, "invalid_secret", "secret")
    assert "whsec_" in reply.body["detail"]
    assert PLAIN not in reply.body["detail"]
    # Rotating a Standard-Webhooks-only subscription to a plain secret, and removing the only
    # header a plain secret signs, are refused the same way.
    standard = await api.post(
        "/subscriptions", {"url": receiver.url, "event_types": ["t.*"], "secret": OLD}
    )
    problem(
        await api.post(f"/subscriptions/{standard.body['id']}/rotate-secret", {"secret": PLAIN}),
        400,
        "invalid_secret",
        "secret",
    )
    hmac_only = await api.post(
        "/subscriptions",
        {
            "url": receiver.url,
            "event_types": ["t.*"],
            "secret": PLAIN,
            "signature_header": "X-Signature",
        },
    )
    problem(
        await api.patch(f"/subscriptions/{hmac_only.body['id']}", {"signature_header": None}),
        400,
        "invalid_secret",
        "signature_header",
    )
    env = {"DATABASE_URL": dsn, "DISPATCHER_ALLOW_CIDRS": "127.0.0.1/32"}
    argv = ["subscriptions", "add", "--url", receiver.url, "--event-type", "t.*"]
    try:
        code = await asyncio.to_thread(cli.main, [*argv, "--secret", PLAIN], env)
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()  # main() pointed logging at the captured stream
    assert code == 2, err
    assert err.startswith("dispatcher: error: secret:")
    assert "[invalid_secret]" in err
    assert err.count("\n") == 1
    assert PLAIN not in err
    assert await pool.fetchval("SELECT count(*) FROM webhook_subscriptions") == 2
