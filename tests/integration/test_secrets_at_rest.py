"""Secrets at rest across the management API and the agent: with DISPATCHER_SECRET_KEYS set,
a rotation stores the new secret sealed and answers with it in clear, deliveries verify with
it (and with the old one through the grace period); the agent seals its callback
subscription's secret and neither it nor ``secrets reencrypt`` rewrites a row the other wrote."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp

import dispatcher
from dispatcher import receiver as receiver_toolkit
from dispatcher import secretbox
from dispatcher.agent import api as agent_api
from dispatcher.agent import store
from dispatcher.db import repository
from dispatcher.db import secrets as db_secrets
from tests import support
from tests.integration.api_support import TOKEN, Client

K1, K2 = secretbox.generate_key(), secretbox.generate_key()
OLD = "whsec_" + "b2xkLXNlY3JldC0wMTIzNDU2Nzg5YWJj"
AGENT_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
CALLBACK_URL = "http://127.0.0.1:9/agent-callbacks/lead-status"


def _verifies(secret: str, request: support.Received) -> bool:
    try:
        receiver_toolkit.verify_standard(secret, request.headers, request.body)
    except receiver_toolkit.VerificationError:
        return False
    return True


# Long and distinctive: a short value ("t1") turned up by chance inside sealed base64 text.
TENANT = "tenant-one-7f3c1a9e"


async def _stored(pool: Any, sid: str | uuid.UUID) -> Any:
    return await pool.fetchrow(
        "SELECT secret, previous_secret, updated_at FROM webhook_subscriptions WHERE id = $1",
        uuid.UUID(str(sid)),
    )


async def test_rotation_via_the_api_seals_the_new_secret_and_returns_it_in_clear(
    start_dispatcher: Any, pool: Any, receiver: support.Receiver
) -> None:
    box = secretbox.SecretBox.from_spec(f"k1:{K1}")
    running = await start_dispatcher(admin_token=TOKEN, secret_keys=f"k1:{K1}")
    async with aiohttp.ClientSession() as session:
        api = Client(session, f"http://127.0.0.1:{running.dispatcher.bound_port}/v1")
        created = await api.post(
            "/subscriptions", {"url": receiver.url, "event_types": ["key.*"], "secret": OLD}
        )
        assert created.status == 201, created
        sid = created.body["id"]
        assert created.body["secret"] == OLD
        before = await _stored(pool, sid)
        assert before["secret"].startswith(secretbox.PREFIX)

        rotated = await api.post(
            f"/subscriptions/{sid}/rotate-secret", {"grace_period_seconds": 600}
        )
        assert rotated.status == 200, rotated
        new = rotated.body["secret"]
        assert new.startswith("whsec_")
        assert new != OLD
        row = await _stored(pool, sid)
        assert row["secret"].startswith("enc:")
        assert box.open(row["secret"]) == new
        # The old value moved over as stored (still sealed), not re-sealed or opened.
        assert row["previous_secret"] == before["secret"]

        async with pool.acquire() as conn:
            during = await dispatcher.publish(conn, "key.rotated", {"n": 1})
        await support.wait_for(lambda: during in receiver.ids(), message="grace delivery")
        [request] = [r for r in receiver.ok() if r.headers["webhook-id"] == during]
        assert _verifies(new, request)
        assert _verifies(OLD, request)

        # Retire the old secret at once: only the newest verifies now.
        newest = "whsec_" + "WllYV1ZVVFNSUVBPTk1MS0pJSEdGRURD"
        again = await api.post(
            f"/subscriptions/{sid}/rotate-secret", {"secret": newest, "grace_period_seconds": 0}
        )
        assert again.body["secret"] == newest
        row = await _stored(pool, sid)
        assert row["secret"].startswith("enc:")
        assert row["previous_secret"] is None
        async with pool.acquire() as conn:
            after = await dispatcher.publish(conn, "key.rotated", {"n": 2})
        await support.wait_for(lambda: after in receiver.ids(), message="post-rotation delivery")
        [request] = [r for r in receiver.ok() if r.headers["webhook-id"] == after]
        assert _verifies(newest, request)
        assert not _verifies(new, request)
        assert not _verifies(OLD, request)


async def _job(pool: Any, box: secretbox.SecretBox, secret: str = AGENT_SECRET) -> uuid.UUID:
    # What the agent's submit handler does (dispatcher.agent.api), minus HTTP.
    async with pool.acquire() as conn:
        return await store.create_job(
            conn,
            job_id=agent_api.new_job_id(),
            prospects=[{"email": "ana@stripe.com"}],
            criteria={},
            webhook_url=CALLBACK_URL,
            secret=secret,
            box=box,
        )


async def test_agent_and_reencrypt_do_not_rewrite_each_others_rows(pool: Any) -> None:
    agent_box = secretbox.SecretBox.from_spec(f"k1:{K1}")
    sid = await _job(pool, agent_box)
    first = await _stored(pool, sid)
    assert first["secret"].startswith(secretbox.PREFIX + "k1:")
    assert agent_box.open(first["secret"]) == AGENT_SECRET

    # Same secret again: sealing again would give another ciphertext; the agent compares the
    # opened value instead, so the row is left alone.
    await _job(pool, agent_box)
    assert await _stored(pool, sid) == first

    # Re-encryption under the same key finds nothing to do, and the agent still agrees.
    done = await db_secrets.reencrypt(pool, agent_box)
    assert (done.subscriptions, done.resealed) == (1, 0)
    await _job(pool, agent_box)
    assert await _stored(pool, sid) == first

    # Key rotation: the operator re-encrypts under k2 while this agent still seals with k1
    # (it has both keys). It must not seal the row back under k1, nor reencrypt again after.
    dispatcher_box = secretbox.SecretBox.from_spec(f"k2:{K2},k1:{K1}")
    assert (await db_secrets.reencrypt(pool, dispatcher_box)).resealed == 1
    resealed = await _stored(pool, sid)
    assert resealed["secret"].startswith(secretbox.PREFIX + "k2:")
    lagging_agent = secretbox.SecretBox.from_spec(f"k1:{K1},k2:{K2}")
    await _job(pool, lagging_agent)
    await _job(pool, dispatcher_box)
    assert await _stored(pool, sid) == resealed
    assert (await db_secrets.reencrypt(pool, dispatcher_box)).resealed == 0

    # A changed AGENT_WEBHOOK_SECRET still rotates, sealed, with the old one kept for grace.
    changed = "whsec_" + "Q" * 32
    await _job(pool, dispatcher_box, changed)
    rotated = await _stored(pool, sid)
    assert dispatcher_box.open(rotated["secret"]) == changed
    assert rotated["previous_secret"] == resealed["secret"]
    assert await pool.fetchval("SELECT count(*) FROM agent_jobs") == 6


async def test_plaintext_row_from_before_keys_is_left_for_reencrypt(pool: Any) -> None:
    sid = await _job(pool, secretbox.PLAINTEXT)
    assert (await _stored(pool, sid))["secret"] == AGENT_SECRET
    box = secretbox.SecretBox.from_spec(f"k1:{K1}")
    # Configuring keys does not make the agent rotate a plaintext row to the same secret.
    await _job(pool, box)
    row = await _stored(pool, sid)
    assert (row["secret"], row["previous_secret"]) == (AGENT_SECRET, None)
    assert (await db_secrets.reencrypt(pool, box)).resealed == 1
    sealed = await _stored(pool, sid)
    assert sealed["secret"].startswith(secretbox.PREFIX)
    await _job(pool, box)
    assert await _stored(pool, sid) == sealed


async def _subscribe_with_headers(api: Client, receiver: support.Receiver, credential: str) -> Any:
    """A subscription through /v1 with an Authorization credential and the tenant header."""
    created = await api.post(
        "/subscriptions",
        {
            "url": receiver.url,
            "event_types": ["hdr.*"],
            "headers": {"Authorization": credential, "X-Tenant": TENANT},
        },
    )
    assert created.status == 201, created
    return created


async def test_header_values_are_sealed_masked_on_read_and_still_sent(
    start_dispatcher: Any, pool: Any, receiver: support.Receiver
) -> None:
    credential = "Bearer receiver-credential-5f1c9e"
    changed = "Bearer receiver-credential-a7d203"
    box = secretbox.SecretBox.from_spec(f"k1:{K1}")
    running = await start_dispatcher(admin_token=TOKEN, secret_keys=f"k1:{K1}")
    async with aiohttp.ClientSession() as session:
        api = Client(session, f"http://127.0.0.1:{running.dispatcher.bound_port}/v1")
        created = await _subscribe_with_headers(api, receiver, credential)
        sid = created.body["id"]
        for shown in (created.body, (await api.get(f"/subscriptions/{sid}")).body):
            assert shown["headers"] == {"Authorization": "********", "X-Tenant": "********"}
        listed = (await api.get("/subscriptions")).body["items"]
        assert credential not in str(listed)
        # What a dump of the table holds: the whole row as text.
        dumped = await pool.fetchval("SELECT string_agg(s::text, '') FROM webhook_subscriptions s")
        assert credential not in dumped
        assert TENANT not in dumped
        stored = await pool.fetchval(
            "SELECT headers ->> 'Authorization' FROM webhook_subscriptions WHERE id = $1",
            uuid.UUID(sid),
        )
        assert box.open(stored) == credential

        async with pool.acquire() as conn:
            first = await dispatcher.publish(conn, "hdr.one", {"n": 1})
        await support.wait_for(lambda: first in receiver.ids(), message="first delivered")
        [request] = [r for r in receiver.ok() if r.headers["webhook-id"] == first]
        assert request.headers["authorization"] == credential
        assert request.headers["x-tenant"] == TENANT

        patched = await api.patch(f"/subscriptions/{sid}", {"headers": {"Authorization": changed}})
        assert patched.status == 200, patched
        assert patched.body["headers"] == {"Authorization": "********"}
        dumped = await pool.fetchval("SELECT string_agg(s::text, '') FROM webhook_subscriptions s")
        assert changed not in dumped
        async with pool.acquire() as conn:
            second = await dispatcher.publish(conn, "hdr.two", {"n": 2})
        await support.wait_for(lambda: second in receiver.ids(), message="second delivered")
        [request] = [r for r in receiver.ok() if r.headers["webhook-id"] == second]
        assert request.headers["authorization"] == changed
        assert "x-tenant" not in request.headers


async def test_reencrypt_seals_header_values_written_in_clear(pool: Any) -> None:
    # A row from before header values were sealed (or written without keys).
    before = await repository.Repository(pool).create_subscription(
        url=CALLBACK_URL,
        event_types=["a.b"],
        secret=OLD,
        headers={"Authorization": "Bearer from-before-keys-91c"},
    )
    raw = "SELECT headers ->> 'Authorization' FROM webhook_subscriptions WHERE id = $1"
    sid = uuid.UUID(before["id"])
    assert await pool.fetchval(raw, sid) == "Bearer from-before-keys-91c"
    box = secretbox.SecretBox.from_spec(f"k1:{K1}")
    assert (await db_secrets.reencrypt(pool, box)).resealed == 1
    sealed = await pool.fetchval(raw, sid)
    assert sealed.startswith(secretbox.PREFIX)
    assert box.open(sealed) == "Bearer from-before-keys-91c"
    assert (await db_secrets.reencrypt(pool, box)).resealed == 0


async def test_a_read_sent_back_keeps_the_masked_header_values(
    start_dispatcher: Any, pool: Any, receiver: support.Receiver
) -> None:
    """Reads mask header values, so a client that PATCHes a read back unchanged sends the mask:
    the stored value of that header stays, a changed one is replaced, and a mask for a header
    the subscription does not have is refused."""
    credential = "Bearer receiver-credential-0c4e1b"
    running = await start_dispatcher(admin_token=TOKEN, secret_keys=f"k1:{K1}")
    async with aiohttp.ClientSession() as session:
        api = Client(session, f"http://127.0.0.1:{running.dispatcher.bound_port}/v1")
        created = await _subscribe_with_headers(api, receiver, credential)
        sid = created.body["id"]
        read = (await api.get(f"/subscriptions/{sid}")).body["headers"]
        patched = await api.patch(f"/subscriptions/{sid}", {"headers": {**read, "X-Tenant": "t2"}})
        assert patched.status == 200, patched
        refused = await api.patch(
            f"/subscriptions/{sid}", {"headers": {**read, "X-Other": "********"}}
        )
        assert refused.status == 400, refused
        async with pool.acquire() as conn:
            event = await dispatcher.publish(conn, "hdr.one", {"n": 1})
        await support.wait_for(lambda: event in receiver.ids(), message="delivered")
        [request] = [r for r in receiver.ok() if r.headers["webhook-id"] == event]
        assert request.headers["authorization"] == credential
        assert request.headers["x-tenant"] == "t2"
