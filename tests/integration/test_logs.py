"""Structured logs: JSON off a terminal, console on one; one canonical ``attempt`` line per
attempt; and never a secret, signature or payload in any line, checked on a real delivery."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

import dispatcher
from dispatcher import logs
from dispatcher.db import repository
from tests import support

SECRET = "whsec_" + "c2VjcmV0LXRoYXQtbXVzdC1uZXZlci1iZS1sb2dnZWQ="
PAYLOAD_MARKER = "payload-marker-7f3a9c"
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9_]*$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every structlog line as JSON, as ``dispatcher run`` writes it when not on a terminal."""
    out = io.StringIO()
    logs.configure(level="debug", fmt="auto", stream=out)
    yield out
    structlog.reset_defaults()


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_auto_format_is_json_off_a_terminal_and_console_on_one() -> None:
    try:
        plain, terminal = io.StringIO(), _Terminal()
        for stream in (plain, terminal):
            logs.configure(fmt="auto", stream=stream)
            structlog.get_logger("t").info("something_happened", delivery_id=7)
        line = json.loads(plain.getvalue())
        assert line["event"] == "something_happened"
        assert line["delivery_id"] == 7
        assert line["level"] == "info"
        assert "timestamp" in line
        console = terminal.getvalue()
        assert "something_happened" in console
        assert "delivery_id" in console
        with pytest.raises(json.JSONDecodeError):
            json.loads(console)
    finally:
        structlog.reset_defaults()


def test_sensitive_keys_are_redacted_as_a_second_line_of_defence(captured: io.StringIO) -> None:
    structlog.get_logger("t").warning("oops", secret=SECRET, body=PAYLOAD_MARKER, url="x")
    [line] = _lines(captured)
    assert line["secret"] == line["body"] == "[redacted]"
    assert SECRET not in captured.getvalue()


async def test_a_delivery_logs_one_canonical_line_per_attempt_and_no_secrets(
    pool: Any,
    receiver: support.Receiver,
    start_dispatcher: Any,
    captured: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.respond = lambda n, _h, _b: (500 if n == 0 else 200, {}, 0.0)
    sub = await repository.Repository(pool).create_subscription(
        url=receiver.url,
        event_types=["t.*"],
        secret=SECRET,
        signature_header="X-AgentX-Signature",
    )
    async with pool.acquire() as conn:
        event_id = await dispatcher.publish(conn, "t.x", {"marker": PAYLOAD_MARKER})
    running = await start_dispatcher()
    await support.wait_for(lambda: len(receiver.ok()) == 1, message="delivered after a retry")
    await running.stop()

    lines = _lines(captured)
    attempts = [line for line in lines if line["event"] == "attempt"]
    assert [(a["attempt"], a["outcome"], a["status"], a["state"]) for a in attempts] == [
        (1, "http_5xx", 500, "retrying"),
        (2, "success", 200, "delivered"),
    ]
    for line in attempts:
        assert line["event_id"] == event_id
        assert line["subscription"] == sub["id"]
        assert line["duration_ms"] >= 0
    # Full jitter may draw a delay that rounds to 0 ms: present and non-negative is the contract.
    assert isinstance(attempts[0]["next_retry_in"], float)
    assert attempts[0]["next_retry_in"] >= 0
    assert attempts[1]["next_retry_in"] is None
    assert all(SNAKE_CASE.match(line["event"]) for line in lines), [x["event"] for x in lines]

    text = captured.getvalue() + caplog.text
    signatures = [
        value
        for request in receiver.requests
        for name in ("webhook-signature", "x-agentx-signature")
        for value in (request.headers[name], *request.headers[name].replace(",", " ").split())
        if len(value) > 8  # the signature material, not the bare "v1" prefix
    ]
    assert signatures
    forbidden = [SECRET, SECRET.removeprefix("whsec_"), PAYLOAD_MARKER, *signatures]
    leaked = [value for value in forbidden if value in text]
    assert not leaked, f"logged: {leaked}"
