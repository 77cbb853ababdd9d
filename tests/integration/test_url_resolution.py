"""A new or changed subscription URL is resolved through the SSRF guard on the shared
management path (admin API, CLI): a name whose every address is blocked is refused with a
clear error, while a name with one allowed address, or one that does not resolve right now,
is accepted (every connection is judged again when it is made)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import aiohttp.resolver
import pytest
import structlog

from dispatcher import cli, ssrf, validation
from dispatcher.db import management
from tests import support
from tests.integration.api_support import TOKEN, Client, problem

NAMES = {
    "internal.example.test": ["10.0.0.7", "169.254.169.254"],
    "mixed.example.test": ["10.0.0.7", "127.0.0.1"],
}


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> support.StaticResolver:
    static = support.StaticResolver(NAMES)
    monkeypatch.setattr(aiohttp.resolver, "DefaultResolver", lambda: static)
    return static


def _spec(url: str) -> dict[str, Any]:
    return {"url": url, "event_types": ["t.*"], "secret": "whsec_" + "A" * 32}


async def test_management_refuses_a_name_that_resolves_only_to_blocked_addresses(
    pool: Any, dns: support.StaticResolver
) -> None:
    policy = ssrf.AddressPolicy.from_strings(["127.0.0.1/32"])
    m = management.Management(pool, check_url=ssrf.resolving_check(policy, dns))
    with pytest.raises(validation.ValidationError) as info:
        await m.create_subscription(_spec("http://internal.example.test/hook"))
    assert (info.value.code, info.value.field) == ("blocked_url", "url")
    assert "10.0.0.7" in info.value.detail
    assert await pool.fetchval("SELECT count(*) FROM webhook_subscriptions") == 0
    mixed = await m.create_subscription(_spec("http://mixed.example.test/hook"))
    unknown = await m.create_subscription(_spec("http://nowhere.example.test/hook"))
    assert {mixed["url"], unknown["url"]} == {
        "http://mixed.example.test/hook",
        "http://nowhere.example.test/hook",
    }
    with pytest.raises(validation.ValidationError):
        await m.update_subscription(
            uuid.UUID(mixed["id"]), {"url": "http://internal.example.test/x"}
        )
    assert "internal.example.test" in dns.asked


async def test_admin_api_answers_400_for_a_blocked_name(
    start_dispatcher: Any, dns: support.StaticResolver
) -> None:
    running = await start_dispatcher(admin_token=TOKEN, url_resolver=dns)
    async with aiohttp.ClientSession() as session:
        await _api_checks(Client(session, f"http://127.0.0.1:{running.dispatcher.bound_port}/v1"))


async def _api_checks(api: Client) -> None:
    reply = await api.post("/subscriptions", _spec("http://internal.example.test/hook"))
    problem(reply, 400, "blocked_url", "url")
    assert "169.254.169.254" in reply.body["detail"] or "10.0.0.7" in reply.body["detail"]
    created = await api.post("/subscriptions", _spec("http://mixed.example.test/hook"))
    assert created.status == 201, created
    changed = await api.patch(
        f"/subscriptions/{created.body['id']}", {"url": "http://internal.example.test/x"}
    )
    problem(changed, 400, "blocked_url", "url")


async def test_cli_add_refuses_a_blocked_name_in_one_line(
    dsn: str, dns: support.StaticResolver, capsys: pytest.CaptureFixture[str], pool: Any
) -> None:
    env = {"DATABASE_URL": dsn, "DISPATCHER_ALLOW_CIDRS": "127.0.0.1/32"}
    argv = [
        "subscriptions",
        "add",
        "--url",
        "http://internal.example.test/h",
        "--event-type",
        "t.*",
    ]
    try:
        code = await asyncio.to_thread(cli.main, argv, env)
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()  # main() pointed logging at the captured stream
    assert code == 2, err
    assert err.count("\n") == 1
    assert err.startswith("dispatcher: error: url:")
    assert "[blocked_url]" in err
    assert await pool.fetchval("SELECT count(*) FROM webhook_subscriptions") == 0
