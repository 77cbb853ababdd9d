"""Property-based run of schemathesis against the served OpenAPI document: no server error,
no response outside the documented statuses, content types and schemas, and invalid input
(per the document) is rejected.

Runs the ``st`` CLI as a subprocess against an in-process dispatcher; the example count is
kept small so the run stays well under a minute. Seed data gives the listings real rows.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import dispatcher
from tests import support
from tests.integration.api_support import TOKEN, Client, api

__all__ = ["api"]  # the fixture, imported for pytest

MAX_EXAMPLES = 8
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        # Wrong methods answer 405 with an Allow header.
        "unsupported_method",
        "allow_header_conformance",
    ]
)
# The document and the validators agree: what the schema allows is accepted. Not asked of the
# operations where a schema-valid request may still be refused for a reason no schema can
# state: the address policy (a host whose addresses are all blocked) and the secret rule that
# depends on the subscription's signature header. A test event's payload is any JSON object
# whose strings hold no NUL at any depth (at most 64 levels): the document says so in words,
# as only a recursive schema could state it.
POLICY_DEPENDENT = (
    "POST /subscriptions",
    "PATCH /subscriptions/{subscription_id}",
    "POST /subscriptions/{subscription_id}/rotate-secret",
    "POST /subscriptions/{subscription_id}/test",
)
ACCEPTANCE = [
    "--checks",
    "positive_data_acceptance",
    *(arg for name in POLICY_DEPENDENT for arg in ("--exclude-name", name)),
]


def _st() -> str | None:
    local = Path(sys.executable).parent / "st"
    return str(local) if local.exists() else shutil.which("st")


@pytest.mark.skipif(_st() is None, reason="schemathesis is not installed (dev dependency)")
async def test_schemathesis_finds_no_errors(
    api: Client, pool: Any, receiver: support.Receiver, tmp_path: Path
) -> None:
    sub = (
        await api.post(
            "/subscriptions",
            {"url": receiver.url, "event_types": ["seed.*"], "metadata": {"k": "v"}},
        )
    ).body["id"]
    async with pool.acquire() as conn:
        for i in range(3):
            await dispatcher.publish(conn, "seed.event", {"i": i})
        await dispatcher.publish(conn, "nobody.listens", {})
    await support.wait_for(lambda: len(receiver.ok()) == 3, message="seed delivered")
    assert sub

    base = api.base  # http://127.0.0.1:<port>/v1
    for selection in (["--checks", CHECKS], ACCEPTANCE):
        proc = await asyncio.create_subprocess_exec(
            str(_st()),
            "run",
            f"{base}/openapi.json",
            "--url",
            base,
            "-H",
            f"Authorization: Bearer {TOKEN}",
            *selection,
            "--max-examples",
            str(MAX_EXAMPLES),
            "--phases",
            "examples,coverage,fuzzing",
            "--generation-database",
            "none",
            "--no-color",
            # One worker: hypothesis describes strategies with ast.parse, which CPython 3.11
            # can break when threads compile concurrently (SystemError: AST recursion depth).
            "--workers",
            "1",
            "--request-timeout",
            "10",
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
        text = output.decode(errors="replace")
        assert proc.returncode == 0, text[-6000:]
