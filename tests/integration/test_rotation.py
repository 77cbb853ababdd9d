"""Secret rotation: during the grace period a receiver holding only the old secret and one
holding only the new secret both verify every request; afterwards only the new one does."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
import standardwebhooks

import dispatcher
from dispatcher import receiver as receiver_toolkit
from tests import support
from tests.integration.api_support import Client, api

__all__ = ["api"]  # the fixture, imported for pytest

OLD = "whsec_" + "b2xkLXNlY3JldC0wMTIzNDU2Nzg5YWJj"
GRACE_SECONDS = 3


def _verifies(secret: str, request: support.Received) -> bool:
    try:
        receiver_toolkit.verify_standard(secret, request.headers, request.body)
    except receiver_toolkit.VerificationError:
        return False
    return True


async def _publish(pool: Any, n: int, tag: str) -> list[str]:
    async with pool.acquire() as conn:
        return [await dispatcher.publish(conn, "key.rotated", {tag: i}) for i in range(n)]


async def test_both_secrets_verify_during_grace_then_only_the_new(
    api: Client, pool: Any, receiver: support.Receiver
) -> None:
    sid = (
        await api.post(
            "/subscriptions", {"url": receiver.url, "event_types": ["key.*"], "secret": OLD}
        )
    ).body["id"]
    await _publish(pool, 2, "before")
    await support.wait_for(lambda: len(receiver.ok()) == 2, message="pre-rotation deliveries")
    assert all(_verifies(OLD, r) for r in receiver.ok())

    rotated = await api.post(
        f"/subscriptions/{sid}/rotate-secret", {"grace_period_seconds": GRACE_SECONDS}
    )
    assert rotated.status == 200
    new = rotated.body["secret"]
    ends_at = datetime.datetime.fromisoformat(rotated.body["rotation_ends_at"]).timestamp()
    during = await _publish(pool, 5, "during")
    await support.wait_for(lambda: len(receiver.ok()) == 7, message="grace-period deliveries")
    grace = [r for r in receiver.ok() if r.headers["webhook-id"] in during]
    assert len(grace) == 5
    assert all(r.at < ends_at for r in grace), "delivered after the grace period; test too slow"
    for request in grace:
        assert len(request.headers["webhook-signature"].split()) == 2
        assert _verifies(OLD, request), "receiver with only the old secret"
        assert _verifies(new, request), "receiver with only the new secret"
        standardwebhooks.Webhook(OLD).verify(request.body, request.headers)
        standardwebhooks.Webhook(new).verify(request.body, request.headers)

    await support.wait_for(lambda: time.time() > ends_at + 0.05, message="grace period over")
    after = await _publish(pool, 3, "after")
    await support.wait_for(lambda: len(receiver.ok()) == 10, message="post-grace deliveries")
    late = [r for r in receiver.ok() if r.headers["webhook-id"] in after]
    for request in late:
        assert len(request.headers["webhook-signature"].split()) == 1
        assert _verifies(new, request)
        assert not _verifies(OLD, request)
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(OLD).verify(request.body, request.headers)
    assert (await api.get(f"/subscriptions/{sid}")).body["rotating"] is False
