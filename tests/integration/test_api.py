"""Admin API: every /v1 route (success, validation errors, auth failures, unknown ids), with a
real dispatcher, a real database and real receivers."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

import dispatcher
from dispatcher import config
from tests import support
from tests.integration.api_support import TOKEN, Client, api, problem

__all__ = ["api"]  # the fixture, imported for pytest

WHSEC = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"


async def _create(api: Client, url: str, **fields: Any) -> dict[str, Any]:
    reply = await api.post("/subscriptions", {"url": url, "event_types": ["order.*"], **fields})
    assert reply.status == 201, reply
    return dict(reply.body)


# -- auth --------------------------------------------------------------------------------------


AUTH_FAILURES = [
    (None, "missing"),
    (f"Bearer {TOKEN}x", "invalid"),
    (f"Basic {TOKEN}", "invalid"),
    ("Bearer", "invalid"),
    ("Bearer " + TOKEN[:-1], "invalid"),
]


async def test_every_route_needs_the_bearer_token(api: Client) -> None:
    from dispatcher.web import admin_api as api_module

    sid, did = uuid.uuid4(), 1
    for (method, path, _handler), (header, detail) in itertools.product(
        api_module.ROUTES, AUTH_FAILURES
    ):
        concrete = path.format(subscription_id=sid, delivery_id=did, event_id="evt_x")
        headers = {} if header is None else {"Authorization": header}
        async with api.session.request(method, api.base + concrete, headers=headers) as resp:
            assert resp.status == 401, (method, path)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            body = await resp.json(content_type=None)
            assert body["code"] == "unauthorized"
            assert detail in body["detail"]


async def test_unknown_v1_path_needs_auth_then_is_a_problem_404(api: Client) -> None:
    problem(await api.with_token(None).get("/nope"), 401, "unauthorized")
    problem(await api.get("/nope"), 404, "http_404")


async def test_probes_stay_open_without_a_token(api: Client) -> None:
    root = api.base.removesuffix("/v1")
    for path in ("/healthz", "/readyz", "/metrics"):
        async with api.session.get(root + path) as resp:
            assert resp.status == 200, path


async def test_closed_probes_need_the_token(start_dispatcher: Any) -> None:
    running = await start_dispatcher(admin_token=TOKEN, open_endpoints=("healthz",))
    root = f"http://127.0.0.1:{running.dispatcher.bound_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(root + "/healthz") as resp:
            assert resp.status == 200
        async with session.get(root + "/metrics") as resp:
            assert resp.status == 401
        async with session.get(
            root + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            assert resp.status == 200


async def test_without_a_token_on_loopback_the_api_is_disabled(start_dispatcher: Any) -> None:
    running = await start_dispatcher(admin_token="")
    base = f"http://127.0.0.1:{running.dispatcher.bound_port}"
    async with aiohttp.ClientSession() as session:
        client = Client(session, base + "/v1", token="anything")
        problem(await client.get("/subscriptions"), 503, "admin_token_not_configured")
        async with session.get(base + "/healthz") as resp:
            assert resp.status == 200


def test_without_a_token_a_non_loopback_listener_refuses_to_start() -> None:
    with pytest.raises(config.ConfigError, match="DISPATCHER_ADMIN_TOKEN"):
        config.Settings(listen_host="0.0.0.0")
    assert config.Settings(listen_host="0.0.0.0", admin_token="t").admin_token == "t"
    assert config.Settings(listen_host="::1").listen_host == "::1"


# -- subscriptions ----------------------------------------------------------------------------


async def test_create_returns_the_secret_once(api: Client, receiver: support.Receiver) -> None:
    created = await _create(
        api,
        receiver.url,
        secret=WHSEC,
        headers={"X-Team": "billing"},
        signature_header="X-Signature",
        max_in_flight=3,
        rate_limit_per_second=2.5,
        retry_policy={"max_attempts": 4},
        description="billing hooks",
        metadata={"owner": "team-b"},
    )
    assert created["secret"] == WHSEC
    assert created["rate_limit_per_second"] == 2.5
    assert created["retry_policy"] == {"max_attempts": 4}
    assert created["metadata"] == {"owner": "team-b"}
    got = await api.get(f"/subscriptions/{created['id']}")
    assert got.status == 200
    assert "secret" not in got.body
    assert got.body == {k: v for k, v in created.items() if k != "secret"}
    listed = await api.get("/subscriptions")
    assert [s["id"] for s in listed.body["items"]] == [created["id"]]
    assert "secret" not in listed.body["items"][0]
    assert listed.body["next_cursor"] is None


async def test_create_generates_a_secret(api: Client, receiver: support.Receiver) -> None:
    created = await _create(api, receiver.url)
    assert created["secret"].startswith("whsec_")


INVALID_CREATES: list[tuple[Any, int, str, str]] = [
    ({"event_types": ["a"]}, 400, "required", "url"),
    ({"url": "http://127.0.0.1:9/x"}, 400, "required", "event_types"),
    ({"url": "ftp://127.0.0.1/x", "event_types": ["a"]}, 400, "invalid_url", "url"),
    ({"url": "http://u:p@127.0.0.1/x", "event_types": ["a"]}, 400, "invalid_url", "url"),
    ({"url": "http://169.254.169.254/x", "event_types": ["a"]}, 400, "blocked_url", "url"),
    ({"url": 5, "event_types": ["a"]}, 400, "invalid_type", "url"),
    ({"url": "http://127.0.0.1:9/", "event_types": []}, 400, "invalid_value", "event_types"),
    (
        {"url": "http://127.0.0.1:9/", "event_types": ["a.*.b"]},
        400,
        "invalid_event_type",
        "event_types[0]",
    ),
    (
        {"url": "http://127.0.0.1:9/", "event_types": ["a"], "max_in_flight": 0},
        400,
        "out_of_range",
        "max_in_flight",
    ),
    (
        {"url": "http://127.0.0.1:9/", "event_types": ["a"], "max_in_flight": True},
        400,
        "invalid_type",
        "max_in_flight",
    ),
    (
        {"url": "http://127.0.0.1:9/", "event_types": ["a"], "rate_limit_per_second": 0},
        400,
        "out_of_range",
        "rate_limit_per_second",
    ),
    (
        {"url": "http://127.0.0.1:9/", "event_types": ["a"], "headers": {"Host": "x"}},
        400,
        "reserved_header",
        "headers.Host",
    ),
    (
        {"url": "http://127.0.0.1:9/", "event_types": ["a"], "headers": {"X-A": "1\r\n2"}},
        400,
        "invalid_header",
        "headers.X-A",
    ),
    (
        {"url": "http://127.0.0.1:9/", "event_types": ["a"], "secret": "short"},
        400,
        "invalid_secret",
        "secret",
    ),
    (
        {
            "url": "http://127.0.0.1:9/",
            "event_types": ["a"],
            "retry_policy": {"base_seconds": 10, "cap_seconds": 1},
        },
        400,
        "invalid_retry_policy",
        "retry_policy",
    ),
    (
        {"url": "http://127.0.0.1:9/", "event_types": ["a"], "signers": ["nope"]},
        400,
        "unknown_signer",
        "signers[0]",
    ),
    (
        {"url": "http://127.0.0.1:9/", "event_types": ["a"], "description": "a\x00b"},
        400,
        "invalid_value",
        "description",
    ),
    (
        {"url": "http://127.0.0.1:9/", "event_types": ["a"], "colour": "red"},
        400,
        "unknown_field",
        "colour",
    ),
    ([1, 2], 400, "invalid_body", "body"),
]


async def test_create_rejects_invalid_input_and_writes_nothing(api: Client, pool: Any) -> None:
    for body, status, code, field in INVALID_CREATES:
        problem(await api.post("/subscriptions", body), status, code, field)
    assert await pool.fetchval("SELECT count(*) FROM webhook_subscriptions") == 0


async def test_create_rejects_malformed_json(api: Client) -> None:
    problem(await api.call("POST", "/subscriptions", raw=b"{nope"), 400, "invalid_json", "body")
    problem(await api.call("POST", "/subscriptions", raw=b""), 400, "body_required", "body")


async def test_list_filters_and_paginates(api: Client, receiver: support.Receiver) -> None:
    made = [await _create(api, receiver.url, event_types=[f"t{i}"]) for i in range(5)]
    await api.post(f"/subscriptions/{made[1]['id']}/disable", {"reason": "x"})
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await api.get("/subscriptions", **params)
        assert page.status == 200
        seen += [s["id"] for s in page.body["items"]]
        cursor = page.body["next_cursor"]
        if cursor is None:
            break
    assert seen == [s["id"] for s in made]
    disabled = await api.get("/subscriptions", enabled="false")
    assert [s["id"] for s in disabled.body["items"]] == [made[1]["id"]]
    by_type = await api.get("/subscriptions", event_type="t3")
    assert [s["id"] for s in by_type.body["items"]] == [made[3]["id"]]
    problem(await api.get("/subscriptions", limit="0"), 400, "out_of_range", "limit")
    problem(await api.get("/subscriptions", limit="x"), 400, "invalid_type", "limit")
    problem(await api.get("/subscriptions", enabled="maybe"), 400, "invalid_value", "enabled")
    problem(await api.get("/subscriptions", cursor="!!"), 400, "invalid_cursor", "cursor")
    deliveries_cursor = (await api.get("/deliveries")).body["next_cursor"]
    assert deliveries_cursor is None


async def test_update_changes_only_given_fields(api: Client, receiver: support.Receiver) -> None:
    created = await _create(api, receiver.url, description="before", rate_limit_per_second=5)
    sid = created["id"]
    reply = await api.patch(
        f"/subscriptions/{sid}",
        {
            "url": receiver.url + "/v2",
            "event_types": ["invoice.paid", "order.*"],
            "headers": {"X-Env": "prod"},
            "signature_header": "X-Sig",
            "max_in_flight": 7,
            "rate_limit_per_second": None,
            "retry_policy": {"max_attempts": 3, "base_seconds": 1.5},
            "metadata": {"k": "v"},
        },
    )
    assert reply.status == 200, reply
    body = reply.body
    assert body["url"] == receiver.url + "/v2"
    assert body["event_types"] == ["invoice.paid", "order.*"]
    assert body["headers"] == {"X-Env": "prod"}
    assert body["signature_header"] == "X-Sig"
    assert body["max_in_flight"] == 7
    assert body["rate_limit_per_second"] is None
    assert body["retry_policy"] == {"max_attempts": 3, "base_seconds": 1.5}
    assert body["description"] == "before"
    assert body["metadata"] == {"k": "v"}
    assert "secret" not in body
    cleared = await api.patch(f"/subscriptions/{sid}", {"signature_header": None})
    assert cleared.body["signature_header"] is None


async def test_rejected_update_changes_nothing(api: Client, receiver: support.Receiver) -> None:
    sid = (await _create(api, receiver.url))["id"]
    before = (await api.get(f"/subscriptions/{sid}")).body
    problem(
        await api.patch(
            f"/subscriptions/{sid}", {"description": "new", "url": "http://10.0.0.1/x"}
        ),
        400,
        "blocked_url",
        "url",
    )
    problem(await api.patch(f"/subscriptions/{sid}", {"url": None}), 400, "invalid_type", "url")
    problem(await api.patch(f"/subscriptions/{sid}", {}), 400, "empty_update", "body")
    problem(await api.patch(f"/subscriptions/{sid}", {"secret": WHSEC}), 400, "unknown_field")
    assert (await api.get(f"/subscriptions/{sid}")).body == before


SUBSCRIPTION_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "", None),
    ("PATCH", "", {"description": "x"}),
    ("DELETE", "", None),
    ("POST", "/enable", None),
    ("POST", "/disable", {"reason": "x"}),
    ("POST", "/rotate-secret", {}),
    ("POST", "/test", {}),
    ("POST", "/retry-dead", {"since": "2024-01-01T00:00:00Z"}),
]


async def test_unknown_subscription_is_404(api: Client) -> None:
    for (method, suffix, body), sid in itertools.product(
        SUBSCRIPTION_ROUTES, (str(uuid.uuid4()), "not-a-uuid")
    ):
        problem(await api.call(method, f"/subscriptions/{sid}{suffix}", body), 404, "not_found")


async def test_disable_with_reason_then_enable(api: Client, receiver: support.Receiver) -> None:
    sid = (await _create(api, receiver.url))["id"]
    off = await api.post(f"/subscriptions/{sid}/disable", {"reason": "receiver migrating"})
    assert off.status == 200
    assert (off.body["enabled"], off.body["disabled_reason"]) == (False, "receiver migrating")
    assert off.body["disabled_at"] is not None
    problem(await api.post(f"/subscriptions/{sid}/disable", {"reason": ""}), 400, "invalid_value")
    on = await api.post(f"/subscriptions/{sid}/enable")
    assert (on.body["enabled"], on.body["disabled_reason"]) == (True, None)


async def test_delete(api: Client, receiver: support.Receiver, pool: Any) -> None:
    sid = (await _create(api, receiver.url))["id"]
    reply = await api.delete(f"/subscriptions/{sid}")
    assert reply.status == 204
    problem(await api.get(f"/subscriptions/{sid}"), 404, "not_found")
    problem(await api.delete(f"/subscriptions/{sid}"), 404, "not_found")
    assert await pool.fetchval("SELECT count(*) FROM webhook_subscriptions") == 0


async def test_rotate_secret(api: Client, receiver: support.Receiver) -> None:
    created = await _create(api, receiver.url, secret=WHSEC)
    sid = created["id"]
    rotated = await api.post(f"/subscriptions/{sid}/rotate-secret", {"grace_period_seconds": 60})
    assert rotated.status == 200
    assert rotated.body["secret"].startswith("whsec_")
    assert rotated.body["secret"] != WHSEC
    assert rotated.body["rotating"] is True
    assert rotated.body["rotation_ends_at"] is not None
    chosen = "whsec_" + "WllYV1ZVVFNSUVBPTk1MS0pJSEdGRURD"
    again = await api.post(
        f"/subscriptions/{sid}/rotate-secret", {"secret": chosen, "grace_period_seconds": 0}
    )
    assert again.body["secret"] == chosen
    assert again.body["rotating"] is False
    assert "secret" not in (await api.get(f"/subscriptions/{sid}")).body
    problem(
        await api.post(f"/subscriptions/{sid}/rotate-secret", {"grace_period_seconds": -1}),
        400,
        "out_of_range",
        "grace_period_seconds",
    )
    problem(
        await api.post(f"/subscriptions/{sid}/rotate-secret", {"secret": "whsec_!!"}),
        400,
        "invalid_secret",
        "secret",
    )


async def test_send_test_event(api: Client, receiver: support.Receiver) -> None:
    sid = (await _create(api, receiver.url))["id"]
    reply = await api.post(f"/subscriptions/{sid}/test", {"payload": {"hello": "world"}})
    assert reply.status == 202
    assert reply.body["event_type"] == "dispatcher.test"
    await support.wait_for(receiver.ok, message="test event delivered")
    assert receiver.requests[0].headers["webhook-id"] == reply.body["event_id"]
    assert orjson.loads(receiver.requests[0].body) == {"hello": "world"}
    problem(await api.post(f"/subscriptions/{sid}/test", {"payload": 3}), 400, "invalid_type")
    await api.post(f"/subscriptions/{sid}/disable", {"reason": "x"})
    problem(await api.post(f"/subscriptions/{sid}/test"), 409, "subscription_disabled")


# -- deliveries and events --------------------------------------------------------------------


async def _publish(pool: Any, event_type: str, **kw: Any) -> str:
    async with pool.acquire() as conn:
        return await dispatcher.publish(conn, event_type, {"type": event_type}, **kw)


async def _state(pool: Any, event_id: str) -> str | None:
    return await pool.fetchval(
        "SELECT d.state FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.outbox_id "
        "WHERE o.event_id = $1",
        event_id,
    )


async def test_deliveries_list_get_retry_cancel(api: Client, pool: Any, make_receiver: Any) -> None:
    good, bad = await make_receiver(), await make_receiver()
    bad.respond = lambda _n, _h, _b: (400, {}, 0.0)
    ok_sub = (await _create(api, good.url))["id"]
    bad_sub = (await _create(api, bad.url))["id"]
    delivered = await _publish(pool, "order.created")
    await support.wait_for(lambda: len(bad.requests) >= 2, message="bad receiver tried twice")

    async def dead() -> bool:
        return await _state(pool, delivered) is not None and all(
            r["state"] in ("delivered", "dead")
            for r in await pool.fetch("SELECT state FROM webhook_deliveries")
        )

    await support.wait_for(dead, message="deliveries finished")

    listing = await api.get("/deliveries")
    assert listing.status == 200
    assert {(d["subscription_id"], d["state"]) for d in listing.body["items"]} == {
        (ok_sub, "delivered"),
        (bad_sub, "dead"),
    }
    only_dead = await api.get("/deliveries", state="dead")
    assert [d["subscription_id"] for d in only_dead.body["items"]] == [bad_sub]
    only_ok = await api.get("/deliveries", subscription_id=ok_sub)
    assert [d["state"] for d in only_ok.body["items"]] == ["delivered"]
    assert (await api.get("/deliveries", event_type="nope")).body["items"] == []
    in_range = await api.get(
        "/deliveries", created_after="2000-01-01T00:00:00Z", created_before="2999-01-01T00:00:00Z"
    )
    assert len(in_range.body["items"]) == 2
    assert (await api.get("/deliveries", created_after="2999-01-01T00:00:00+02:00")).body[
        "items"
    ] == []
    problem(await api.get("/deliveries", state="lost"), 400, "invalid_value", "state")
    problem(await api.get("/deliveries", created_after="yesterday"), 400, "invalid_value")
    problem(await api.get("/deliveries", subscription_id="x"), 400, "invalid_uuid")
    problem(await api.get("/deliveries", cursor="e30"), 400, "invalid_cursor")

    dead_id = only_dead.body["items"][0]["id"]
    detail = await api.get(f"/deliveries/{dead_id}")
    assert detail.status == 200
    assert detail.body["payload"] == {"type": "order.created"}
    assert [(a["attempt"], a["status_code"], a["manual"]) for a in detail.body["attempt_log"]] == [
        (1, 400, False),
        (2, 400, False),
    ]

    bad.respond = lambda _n, _h, _b: (200, {}, 0.0)
    retried = await api.post(f"/deliveries/{dead_id}/retry")
    assert retried.status == 202
    await support.wait_for(
        lambda: len(bad.ok()) == 1, message="retried delivery arrives at the fixed receiver"
    )

    async def delivered_again() -> bool:
        body = (await api.get(f"/deliveries/{dead_id}")).body
        return bool(body["state"] == "delivered" and len(body["attempt_log"]) == 3)

    await support.wait_for(delivered_again, message="retry recorded")
    last = (await api.get(f"/deliveries/{dead_id}")).body["attempt_log"][-1]
    assert (last["attempt"], last["manual"], last["status_code"]) == (3, True, 200)

    # Cancel: a parked delivery (its subscription is disabled) can be cancelled once.
    await api.post(f"/subscriptions/{ok_sub}/disable", {"reason": "hold"})
    parked = await _publish(pool, "order.parked", subscription_id=ok_sub)
    await support.wait_for(lambda: _state(pool, parked), message="routed")
    parked_id = await pool.fetchval(
        "SELECT d.id FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.outbox_id "
        "WHERE o.event_id = $1",
        parked,
    )
    problem(await api.post(f"/deliveries/{parked_id}/retry"), 409, "subscription_disabled")
    cancelled = await api.post(f"/deliveries/{parked_id}/cancel")
    assert cancelled.status == 200
    assert cancelled.body["state"] == "cancelled"
    problem(await api.post(f"/deliveries/{parked_id}/cancel"), 409, "delivery_not_cancellable")

    for missing in ("999999", "0", "abc", "99999999999999999999"):
        problem(await api.get(f"/deliveries/{missing}"), 404, "not_found")
        problem(await api.post(f"/deliveries/{missing}/retry"), 404, "not_found")
        problem(await api.post(f"/deliveries/{missing}/cancel"), 404, "not_found")


async def test_retry_dead_bulk_validation(api: Client, receiver: support.Receiver) -> None:
    sid = (await _create(api, receiver.url))["id"]
    reply = await api.post(f"/subscriptions/{sid}/retry-dead", {"since": "2024-01-01T00:00:00Z"})
    assert reply.status == 200
    assert reply.body["retried"] == 0
    problem(await api.post(f"/subscriptions/{sid}/retry-dead", {}), 400, "required", "since")
    problem(
        await api.post(f"/subscriptions/{sid}/retry-dead", {"since": "2024-01-01"}),
        400,
        "invalid_value",
        "since",
    )


async def test_events_get_and_unrouted(api: Client, pool: Any, receiver: support.Receiver) -> None:
    sid = (await _create(api, receiver.url))["id"]
    routed = await _publish(pool, "order.created")
    unmatched = await _publish(pool, "nobody.listens")
    unknown = await _publish(pool, "order.created", subscription_id=uuid.uuid4())
    await support.wait_for(receiver.ok, message="routed event delivered")

    async def all_routed() -> bool:
        return bool(
            await pool.fetchval("SELECT bool_and(routed_at IS NOT NULL) FROM webhook_outbox")
        )

    await support.wait_for(all_routed, message="events routed")
    event = await api.get(f"/events/{routed}")
    assert event.status == 200
    assert event.body["route_result"] == "routed"
    assert event.body["payload"] == {"type": "order.created"}
    assert [d["subscription_id"] for d in event.body["deliveries"]] == [sid]
    problem(await api.get("/events/evt_missing"), 404, "not_found")

    page = await api.get("/unrouted-events", limit="1")
    assert [e["event_id"] for e in page.body["items"]] == [unknown]
    assert page.body["items"][0]["route_result"] == "unknown_subscription"
    rest = await api.get("/unrouted-events", cursor=page.body["next_cursor"])
    assert [e["event_id"] for e in rest.body["items"]] == [unmatched]
    assert rest.body["next_cursor"] is None
