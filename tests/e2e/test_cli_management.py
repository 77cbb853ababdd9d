"""The operator CLI as a real subprocess (``python -m dispatcher``) against a real database:
subscriptions get/update/enable/disable/delete/rotate-secret/test, deliveries list/get/retry/
retry-dead/cancel, events get/unrouted; --json, tables, progress, errors, --help."""

from __future__ import annotations

import asyncio
import contextlib
import io
from typing import Any

import pytest

import dispatcher
from dispatcher import cli
from dispatcher.db import repository
from tests import support

Result = support.CliResult


def _env(dsn: str) -> dict[str, str]:
    return support.cli_env(dsn, DISPATCHER_ALLOW_CIDRS="127.0.0.1/32", DISPATCHER_LOG_FORMAT="json")


async def _cli(dsn: str, *args: str) -> Result:
    return await support.run_cli(_env(dsn), *args)


async def _failed(result: Result, *needles: str) -> None:
    assert result.code == 2, result
    assert result.out == ""
    assert result.err.startswith("dispatcher: error: "), result.err
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in result.err, result.err


async def test_subscription_lifecycle(dsn: str) -> None:
    # Independent invocations run side by side: each is a whole interpreter start-up.
    added, missing = await asyncio.gather(
        _cli(
            dsn, "subscriptions", "add", "--url", "http://127.0.0.1:9/hook", "--event-type", "a.*"
        ),
        _cli(dsn, "subscriptions", "get", "00000000-0000-0000-0000-000000000000"),
    )
    created = added.json()
    sid = created["id"]
    await _failed(missing, "does not exist", "[not_found]")

    # `get` reads the URL, which the concurrent update leaves alone.
    got, updated, blocked = await asyncio.gather(
        _cli(dsn, "subscriptions", "get", sid, "--json"),
        _cli(
            dsn,
            "subscriptions",
            "update",
            sid,
            "--max-in-flight",
            "3",
            "--rate-limit",
            "5",
            "--header",
            "X-Team=billing",
            "--retry-policy",
            '{"max_attempts": 4}',
            "--metadata",
            "owner=ops",
            "--json",
        ),
        _cli(dsn, "subscriptions", "update", sid, "--url", "http://169.254.169.254/x"),
    )
    assert got.json()["url"] == "http://127.0.0.1:9/hook"
    assert "secret" not in got.json()
    body = updated.json()
    assert (body["max_in_flight"], body["rate_limit_per_second"]) == (3, 5.0)
    assert body["headers"] == {"X-Team": "billing"}
    assert body["retry_policy"] == {"max_attempts": 4}
    assert body["metadata"] == {"owner": "ops"}
    await _failed(blocked, "url:", "[blocked_url]")

    disabled = await _cli(dsn, "subscriptions", "disable", sid, "--reason", "maintenance")
    assert disabled.code == 0
    assert "maintenance" in disabled.out  # the readable form: one field per line
    await _failed(await _cli(dsn, "subscriptions", "test", sid), "[subscription_disabled]")
    assert (await _cli(dsn, "subscriptions", "enable", sid, "--json")).json()["enabled"] is True

    rotated, queued = await asyncio.gather(
        _cli(dsn, "subscriptions", "rotate-secret", sid, "--grace", "60", "--json"),
        _cli(dsn, "subscriptions", "test", sid, "--payload", '{"ping": 1}', "--json"),
    )
    assert rotated.json()["secret"] != created["secret"]
    assert rotated.json()["rotating"] is True
    assert queued.json()["event_type"] == "dispatcher.test"

    deleted = await _cli(dsn, "subscriptions", "delete", sid)
    assert deleted.code == 0
    assert f"deleted subscription {sid}" in deleted.out


async def test_deliveries_and_events(dsn: str, pool: Any) -> None:
    repo = repository.Repository(pool)
    sub = await repo.create_subscription(
        url="http://127.0.0.1:9/x", event_types=["job.*"], secret="whsec_" + "C" * 32
    )
    sid = str(sub["id"])
    async with pool.acquire() as conn:
        events = [await dispatcher.publish(conn, "job.done", {"n": i}) for i in range(3)]
        unmatched = await dispatcher.publish(conn, "nobody.cares", {})
    await repo.route(100)
    # Two dead (as after exhausted retries), one still pending.
    await pool.execute(
        "UPDATE webhook_deliveries d SET state = 'dead', attempt = 2, finished_at = now() "
        "FROM webhook_outbox o WHERE o.id = d.outbox_id AND o.event_id = ANY($1)",
        events[:2],
    )
    ids = {
        r["event_id"]: r["id"]
        for r in await pool.fetch(
            "SELECT o.event_id, d.id FROM webhook_deliveries d "
            "JOIN webhook_outbox o ON o.id = d.outbox_id"
        )
    }

    pending_id = str(ids[events[2]])
    # Every read-only invocation at once: each is a whole interpreter start-up.
    every, dead, table, bad_since, detail, unrouted, event_table, no_event = await asyncio.gather(
        _cli(dsn, "deliveries", "list", "--limit", "1", "--all", "--json"),
        _cli(dsn, "deliveries", "list", "--state", "dead", "--subscription", sid, "--json"),
        _cli(dsn, "deliveries", "list"),
        _cli(dsn, "deliveries", "list", "--since", "yesterday"),
        _cli(dsn, "deliveries", "get", pending_id),
        _cli(dsn, "events", "unrouted", "--json"),
        _cli(dsn, "events", "get", events[0]),
        _cli(dsn, "events", "get", "evt_missing"),
    )
    assert sorted(d["id"] for d in every.json()["items"]) == sorted(ids.values())
    assert {d["event_id"] for d in dead.json()["items"]} == set(events[:2])
    assert table.code == 0
    assert table.out.splitlines()[0].split()[:3] == ["ID", "STATE", "ATTEMPTS"]
    assert len(table.out.splitlines()) == 4
    await _failed(bad_since, "created_after", "RFC 3339")
    assert detail.code == 0
    assert "event_type" in detail.out
    assert [e["event_id"] for e in unrouted.json()["items"]] == [unmatched]
    assert events[0] in event_table.out
    await _failed(no_event, "[not_found]")

    replay = await _cli(
        dsn,
        "deliveries",
        "retry-dead",
        "--subscription",
        sid,
        "--since",
        "2000-01-01T00:00:00Z",
        "--batch",
        "1",
        "--json",
    )
    assert replay.json()["retried"] == 2
    assert "retry-dead: 1/2 queued" in replay.err
    assert "retry-dead: 2/2 queued" in replay.err
    rows = await pool.fetch("SELECT state, manual_replay FROM webhook_deliveries")
    assert [(r["state"], r["manual_replay"]) for r in rows].count(("pending", True)) == 2

    retried = await _cli(dsn, "deliveries", "retry", pending_id, "--json")
    assert retried.json()["manual_retry_pending"] is True
    cancelled = (await _cli(dsn, "deliveries", "cancel", pending_id, "--json")).json()
    assert cancelled["state"] == "cancelled"
    await _failed(await _cli(dsn, "deliveries", "cancel", pending_id), "[delivery_not_cancellable]")


async def test_unreachable_database_is_a_clear_error() -> None:
    result = await _cli("postgresql://nobody@127.0.0.1:1/none", "deliveries", "list")
    await _failed(result, "database:")


@pytest.mark.parametrize(
    "argv",
    [
        ["subscriptions"],
        *[
            ["subscriptions", c]
            for c in ("get", "update", "enable", "disable", "delete", "rotate-secret", "test")
        ],
        ["deliveries"],
        *[["deliveries", c] for c in ("list", "get", "retry", "retry-dead", "cancel")],
        ["events"],
        ["events", "get"],
        ["events", "unrouted"],
    ],
)
def test_help_everywhere(argv: list[str]) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"], env={})
    assert exited.value.code == 0
    assert out.getvalue().startswith("usage: dispatcher")
