"""The operator CLI as a real subprocess: a subscription to ``dispatcher.*`` is added like any
other, and the CLI's disable, enable and rotate-secret are announced as operational events."""

from __future__ import annotations

import asyncio
from typing import Any

from tests import support
from tests.integration.test_operational_events import operational_events


async def _cli(dsn: str, *args: str) -> support.CliResult:
    return await support.run_cli(support.cli_env(dsn, DISPATCHER_ALLOW_CIDRS="127.0.0.1/32"), *args)


async def test_operations_subscription_and_operator_changes(dsn: str, pool: Any) -> None:
    ops, target = await asyncio.gather(
        _cli(
            dsn,
            *("subscriptions", "add", "--url", "http://127.0.0.1:9/ops"),
            *("--event-type", "dispatcher.*"),
        ),
        _cli(
            dsn,
            *("subscriptions", "add", "--url", "http://127.0.0.1:9/orders?k=v"),
            *("--event-type", "order.*", "--description", "orders"),
        ),
    )
    assert ops.json()["event_types"] == ["dispatcher.*"]
    sid = target.json()["id"]
    # In this order: each one is a change of the one before.
    for args in (("disable", sid, "--reason", "maintenance"), ("enable", sid)):
        assert (await _cli(dsn, "subscriptions", *args)).code == 0
    assert (await _cli(dsn, "subscriptions", "rotate-secret", sid, "--grace", "0")).code == 0

    events = await operational_events(pool)
    assert [e["type"] for e in events] == [
        "dispatcher.subscription.disabled",
        "dispatcher.subscription.enabled",
        "dispatcher.subscription.secret_rotated",
    ]
    assert {e["ordering_key"] for e in events} == {sid}
    disabled = events[0]["data"]
    assert (disabled["reason"], disabled["detail"]) == ("operator", "maintenance")
    assert disabled["url_host"] == "127.0.0.1"
    assert events[2]["data"]["previous_secret_valid_until"] is None
