"""The CLI refuses what ``/v1`` refuses, through the same validation, as a real subprocess
(``python -m dispatcher``) against a real database: exit status 2, one line on stderr, never
a traceback, never the secret, and nothing written. ``subscriptions list`` pages like every
other listing."""

from __future__ import annotations

import asyncio

import pytest

from tests import support

SECRET = "whsec_" + "c2VjcmV0LXRoYXQtbXVzdC1uZXZlci1sZWFr"  # base64 of a recognisable text
URL = "http://127.0.0.1:9/hook"


async def _cli(dsn: str, *args: str) -> support.CliResult:
    return await support.run_cli(support.cli_env(dsn, DISPATCHER_ALLOW_CIDRS="127.0.0.1/32"), *args)


def _refused(result: support.CliResult, needle: str) -> None:
    assert result.code == 2, result
    assert result.out == ""
    assert result.err.startswith("dispatcher: error: "), result.err
    assert result.err.count("\n") == 1, f"more than one line: {result.err!r}"
    assert needle in result.err, result.err
    assert "Traceback" not in result.err
    assert SECRET not in result.err


def _add(*extra: str) -> list[str]:
    return ["subscriptions", "add", "--url", URL, "--secret", SECRET, *extra]


OK_TYPE = ("--event-type", "a.b")
# id → (extra arguments of `subscriptions add`, what the one line names)
REFUSED: dict[str, tuple[tuple[str, ...], str]] = {
    "sig-crlf": ((*OK_TYPE, "--signature-header", "X-Sig\r\nX-Evil: 1"), "signature_header"),
    "sig-space": ((*OK_TYPE, "--signature-header", "X Sig"), "signature_header"),
    "sig-host": ((*OK_TYPE, "--signature-header", "Host"), "reserved_header"),
    "sig-content-length": ((*OK_TYPE, "--signature-header", "Content-Length"), "reserved_header"),
    "sig-standard": ((*OK_TYPE, "--signature-header", "webhook-signature"), "reserved_header"),
    "type-empty": (("--event-type", ""), "event_types[0]"),
    "type-percent": (("--event-type", "%"), "invalid_event_type"),
    "type-space": (("--event-type", "a b"), "invalid_event_type"),
    "max-in-flight-high": ((*OK_TYPE, "--max-in-flight", "99999"), "max_in_flight"),
    "max-in-flight-zero": ((*OK_TYPE, "--max-in-flight", "0"), "max_in_flight"),
    "header-host": ((*OK_TYPE, "--header", "Host=evil"), "reserved_header"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_subscriptions_add_refuses_what_the_api_refuses(dsn: str, case: str) -> None:
    extra, needle = REFUSED[case]
    _refused(await _cli(dsn, *_add(*extra)), needle)
    page = (await _cli(dsn, "subscriptions", "list", "--json")).json()
    assert page == {"items": [], "next_cursor": None}, "a refused subscription was written"


async def test_subscriptions_list_pages_like_every_listing(dsn: str) -> None:
    added = await asyncio.gather(*[_cli(dsn, *_add("--event-type", f"t{i}.*")) for i in range(3)])
    ids = {r.json()["id"] for r in added}
    first = (await _cli(dsn, "subscriptions", "list", "--json", "--limit", "2")).json()
    assert set(first) == {"items", "next_cursor"}
    assert len(first["items"]) == 2
    assert first["next_cursor"]
    assert all("secret" not in item for item in first["items"])
    rest = (
        await _cli(dsn, "subscriptions", "list", "--json", "--cursor", first["next_cursor"])
    ).json()
    assert rest["next_cursor"] is None
    assert {s["id"] for s in first["items"] + rest["items"]} == ids
    every = (await _cli(dsn, "subscriptions", "list", "--json", "--limit", "1", "--all")).json()
    assert {s["id"] for s in every["items"]} == ids
    table = await _cli(dsn, "subscriptions", "list")
    assert table.code == 0
    assert all(sid in table.out for sid in ids)


async def test_subscriptions_list_refuses_bad_paging(dsn: str) -> None:
    bad_limit, bad_cursor, other_cursor = await asyncio.gather(
        _cli(dsn, "subscriptions", "list", "--limit", "0"),
        _cli(dsn, "subscriptions", "list", "--cursor", "not-a-cursor"),
        # A cursor of another listing (deliveries) is not a subscriptions cursor.
        _cli(dsn, "subscriptions", "list", "--cursor", "eyJrIjoiZGVsaXZlcmllcyIsInYiOlsiMSJdfQ"),
    )
    _refused(bad_limit, "limit")
    _refused(bad_cursor, "invalid_cursor")
    _refused(other_cursor, "invalid_cursor")
