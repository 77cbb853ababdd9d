"""Bad input at the edges of ``/v1`` gets a 400 (or a 405 for a wrong method), never a 500, and
a database error never reaches a log line with the row it quotes. A real dispatcher, a real
database."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from tests.integration.api_support import Client, api, problem

__all__ = ["api"]  # the fixture, imported for pytest

WHSEC = "whsec_" + "Ym91bmRhcnktc2VjcmV0LXZhbHVl"  # base64 of a recognisable text
URL = "http://127.0.0.1:9/hook"


async def _create(api: Client, **fields: Any) -> dict[str, Any]:
    body = {"url": URL, "event_types": ["order.*"], "secret": WHSEC, **fields}
    reply = await api.post("/subscriptions", body)
    assert reply.status == 201, reply
    return dict(reply.body)


async def test_upper_case_scheme_is_stored_lower_case(api: Client) -> None:
    created = await _create(api, url="HTTP://127.0.0.1:9/Hook")
    assert created["url"] == "http://127.0.0.1:9/Hook"
    changed = await api.patch(f"/subscriptions/{created['id']}", {"url": "Http://127.0.0.1:9/x"})
    assert changed.status == 200, changed
    assert changed.body["url"] == "http://127.0.0.1:9/x"


async def test_a_database_error_is_logged_without_its_detail(
    api: Client, dsn: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # A rule only the database knows (a producer's own constraint): the statement fails with a
    # "Failing row contains (...)" detail that quotes the secret.
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "ALTER TABLE webhook_subscriptions ADD CONSTRAINT local_rule CHECK (description <> 'x')"
        )
    finally:
        await conn.close()
    reply = await api.post(
        "/subscriptions",
        {"url": URL, "event_types": ["a.b"], "secret": WHSEC, "description": "x"},
    )
    problem(reply, 500, "internal_error")
    captured = capfd.readouterr()
    text = captured.out + captured.err + caplog.text
    assert "api_request_failed" in text
    assert "local_rule" in text, "the constraint's name helps and quotes no value"
    assert WHSEC not in text
    assert "Failing row" not in text


@pytest.mark.parametrize("char", ["\x0b", "\x7f", "\x00", "\x1f", "\x85", "\t\x01"])
async def test_header_values_with_control_characters_are_refused(api: Client, char: str) -> None:
    reply = await api.post(
        "/subscriptions",
        {"url": URL, "event_types": ["a.b"], "headers": {"X-Tenant": f"a{char}b"}},
    )
    problem(reply, 400, "invalid_header" if char != "\x00" else "invalid_value", "headers.X-Tenant")


async def test_a_tab_inside_a_header_value_is_allowed(api: Client) -> None:
    created = await _create(api, headers={"X-Tenant": "a\tb"})
    assert set(created["headers"]) == {"X-Tenant"}


@pytest.mark.parametrize(
    ("path", "tag"),
    [("/deliveries", "d"), ("/unrouted-events", "e")],
)
async def test_cursor_ids_beyond_64_bits_are_400(api: Client, path: str, tag: str) -> None:
    for value in ("9999999999999999999", str(2**63), "9" * 40):
        problem(await api.get(path, cursor=tag + value), 400, "invalid_cursor", "cursor")
    # Any id the pattern allows is a place to start a page.
    assert (await api.get(path, cursor=tag + "9" * 18)).status == 200


async def test_subscription_event_cursor_beyond_64_bits_is_400(api: Client) -> None:
    sid = (await _create(api))["id"]
    reply = await api.get(f"/subscriptions/{sid}/events", cursor="h" + str(2**63))
    problem(reply, 400, "invalid_cursor", "cursor")


@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00+14:00",  # before year 1 once the offset is applied
        "9999-12-31T23:59:59-14:00",  # after Python's year 9999 once applied
        "0000-01-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
    ],
)
async def test_dates_outside_the_range_are_400(api: Client, value: str) -> None:
    problem(
        await api.get("/deliveries", created_after=value), 400, "invalid_value", "created_after"
    )
    sid = (await _create(api))["id"]
    reply = await api.post(f"/subscriptions/{sid}/retry-dead", {"since": value})
    problem(reply, 400, "invalid_value", "since")


async def test_a_subscription_cursor_beyond_the_date_range_is_400(api: Client) -> None:
    far = "s" + "9" * 40 + "-" + "0" * 32
    problem(await api.get("/subscriptions", cursor=far), 400, "invalid_cursor", "cursor")
    near = "s" + "9" * 17 + "-" + "f" * 32
    assert (await api.get("/subscriptions", cursor=near)).status == 200


async def test_a_deeply_nested_test_payload_is_400(api: Client) -> None:
    sid = (await _create(api))["id"]
    # orjson refuses to write more than 254 levels; the body is built by hand.
    raw = b'{"payload":' + b'{"a":' * 1000 + b'"leaf"' + b"}" * 1000 + b"}"
    reply = await api.call("POST", f"/subscriptions/{sid}/test", raw=raw)
    assert reply.status == 400, reply
    assert reply.body["field"] in ("body", "payload"), reply.body


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/subscriptions"),
        ("DELETE", "/deliveries"),
        ("POST", "/events/evt_1"),
        ("PUT", "/subscriptions/00000000-0000-0000-0000-000000000000"),
    ],
)
async def test_a_wrong_method_is_405_with_allow(api: Client, method: str, path: str) -> None:
    reply = await api.call(method, path)
    problem(reply, 405, "http_405")
    assert reply.headers.get("allow"), reply.headers


async def test_an_unknown_path_is_still_404(api: Client) -> None:
    problem(await api.get("/nope/deeper"), 404, "http_404")


async def test_a_whitespace_body_is_invalid_json_not_an_absent_one(api: Client) -> None:
    # An empty body means "no options"; whitespace alone is a body that is not JSON.
    sid = "00000000-0000-0000-0000-000000000001"
    reply = await api.call("POST", f"/subscriptions/{sid}/rotate-secret", raw=b"\t")
    problem(reply, 400, "invalid_json")
