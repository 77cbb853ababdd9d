"""The docs' runnable examples, run as written against a real database and a real delivery.

The SQL producer block and the Python producer block (docs/producing.md) publish into a fresh
database; a real dispatcher delivers both events to two real receivers: the aiohttp receiver of
docs/verifying.md (its `dispatcher.receiver` block, verbatim) and a recording receiver checked
with that page's standard-library verification sketch. A scrape of the running dispatcher's
/metrics then shows every contract metric docs/observability.md names. The statement the docs
say `dispatcher.publish` runs is run by hand and must insert what `publish` inserts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import prometheus_client.parser
import pytest
from aiohttp import web

import dispatcher
from dispatcher import receiver as dispatcher_receiver
from dispatcher import signing
from dispatcher.db import repository
from tests import support
from tests.unit.test_docs import doc, marked_block, section

SIGNATURE_HEADER = "X-AgentX-Signature"


def _run_block(name: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Execute the docs block ``name`` as a module body; returns its namespace."""
    scope: dict[str, Any] = {"__name__": f"docs_{name.replace('-', '_')}"}
    scope.update(namespace or {})
    exec(compile(marked_block(name), f"docs[{name}]", "exec"), scope)  # run as written
    return scope


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def _signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """What the dispatcher would send for ``body`` (both schemes), for hand-made requests."""
    registry = signing.SignerRegistry.load()
    item = signing.SigningInput(msg_id, timestamp, body, (secret,), SIGNATURE_HEADER)
    headers = signing.sign(registry.for_subscription(SIGNATURE_HEADER, ()), item)
    return {**headers, "content-type": "application/json"}


async def test_docs_examples_deliver_and_verify_for_real(
    pool: Any,
    receiver: support.Receiver,
    start_dispatcher: Callable[..., Any],
    monkeypatch: Any,
) -> None:
    readme_secret, plain_secret = signing.generate_secret(), signing.generate_secret()

    # The documented receiver, verbatim; `handle_event` is "your code".
    handled: list[dict[str, Any]] = []

    async def handle_event(event: dict[str, Any]) -> None:
        handled.append(event)

    monkeypatch.setenv("WEBHOOK_SECRET", readme_secret)
    receiver_scope = _run_block("receiver-python", {"handle_event": handle_event})
    runner, port = await _serve(receiver_scope["app"])
    verify = _run_block("receiver-stdlib")["verify"]
    try:
        repo = repository.Repository(pool)
        await repo.create_subscription(
            url=f"http://127.0.0.1:{port}/webhooks",
            event_types=["order.*"],
            secret=readme_secret,
            signature_header=SIGNATURE_HEADER,
        )
        await repo.create_subscription(
            url=receiver.url,
            event_types=["order.paid"],
            secret=plain_secret,
            signature_header=SIGNATURE_HEADER,
        )

        # Producers, as the docs show them: plain SQL, then the Python helper.
        await pool.execute(marked_block("sql-producer"))
        await pool.execute("CREATE TABLE orders (id integer PRIMARY KEY, status text NOT NULL)")
        await pool.execute("INSERT INTO orders VALUES (7, 'new')")
        mark_paid = _run_block("python-producer")["mark_paid"]
        assert await mark_paid(pool, 7) == "order-7-paid"
        assert await pool.fetchval("SELECT status FROM orders WHERE id = 7") == "paid"

        running = await start_dispatcher()
        await support.wait_for(
            lambda: len(handled) == 2 and len(receiver.ok()) == 2,
            timeout=15,
            message="both events delivered to both receivers",
        )

        # The documented receiver verified and processed both events, once each.
        assert sorted(handled, key=lambda e: e["order_id"]) == [
            {"order_id": 7, "status": "paid"},
            {"order_id": 1042, "amount_cents": 1999, "currency": "EUR"},
        ]

        # The standard-library sketch verifies what the dispatcher really sent, and only that.
        assert {r.headers["webhook-id"] for r in receiver.ok()} == {
            "order-1042-paid",
            "order-7-paid",
        }
        for request in receiver.ok():
            headers, body = request.headers, request.body
            assert verify(plain_secret, headers, body, SIGNATURE_HEADER.lower())
            assert verify(plain_secret, headers, body)
            assert not verify(plain_secret, headers, body + b" ", SIGNATURE_HEADER.lower())
            assert not verify(readme_secret, headers, body)
            stale = {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 600)}
            assert not verify(plain_secret, stale, body)
            # The body is the payload as jsonb renders it (docs/producing.md).
            assert json.loads(body)["order_id"] in (7, 1042)

        # The documented receiver acknowledges a duplicate without processing it, rejects a forgery;
        # its framework-neutral helper agrees.
        sql_event = next(r for r in receiver.ok() if r.headers["webhook-id"] == "order-1042-paid")
        body = sql_event.body
        timestamp = int(sql_event.headers["webhook-timestamp"])
        good = _signed_headers(readme_secret, "order-1042-paid", timestamp, body)
        forged = _signed_headers(plain_secret, "order-1042-paid", timestamp, body)
        url = f"http://127.0.0.1:{port}/webhooks"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=body, headers=good) as resp:
                assert (resp.status, await resp.json()) == (200, {"status": "duplicate"})
            async with session.post(url, data=body, headers=forged) as resp:
                assert resp.status == 401
        assert len(handled) == 2
        authentic = receiver_scope["webhook_id_if_authentic"]
        assert authentic(good, body) == "order-1042-paid"
        with pytest.raises(dispatcher_receiver.InvalidSignatureError):
            authentic(forged, body)

        # Every contract metric the docs' table names is in a real scrape.
        metrics_url = f"http://127.0.0.1:{running.dispatcher.bound_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(metrics_url) as resp:
            exposition = await resp.text()
        scraped = {
            f.name for f in prometheus_client.parser.text_string_to_metric_families(exposition)
        }
        metrics_section = section("Metrics", doc("observability.md"))
        contract_table = metrics_section.split("And beyond the contract")[0]
        documented = set(re.findall(r"^\| `(dispatcher_[a-z0-9_]+)` \|", contract_table, re.M))
        assert len(documented) == 9
        # The parser names counter families without their _total suffix.
        assert {n.removesuffix("_total") for n in documented} - scraped == set()
    finally:
        await runner.cleanup()


async def test_the_documented_publish_statement_inserts_what_publish_inserts(pool: Any) -> None:
    statement = marked_block("publish-sql")
    repo = repository.Repository(pool)
    subscription = await repo.create_subscription(
        url="https://example.com/hooks", event_types=["order.*"], secret=signing.generate_secret()
    )
    payload = {"order_id": 7, "lines": [{"sku": "a", "qty": 2}], "note": "é"}
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    by_hand = await pool.fetchval(
        statement,
        "order.paid",
        json.dumps(payload),
        subscription["id"],
        "order-7",
        "by-hand",
        traceparent,
        "shop=1",
    )
    async with pool.acquire() as conn:
        published = await dispatcher.publish(
            conn,
            "order.paid",
            payload,
            event_id="published",
            subscription_id=subscription["id"],
            ordering_key="order-7",
            traceparent=traceparent,
            tracestate="shop=1",
        )
    assert (by_hand, published) == ("by-hand", "published")
    columns = (
        "event_type, payload, subscription_id, ordering_key, routed_at, traceparent, tracestate"
    )
    rows = await pool.fetch(
        f"SELECT event_id, {columns} FROM webhook_outbox WHERE event_id = ANY($1::text[])",
        ["by-hand", "published"],
    )
    by_id = {row["event_id"]: {k: row[k] for k in columns.split(", ")} for row in rows}
    assert by_id["by-hand"] == by_id["published"]

    # NULL for $5: both generate an `evt_<uuid hex>` id; an id that exists is refused by both.
    generated = await pool.fetchval(statement, "order.paid", "{}", None, None, None, None, None)
    async with pool.acquire() as conn:
        generated_by_publish = await dispatcher.publish(conn, "order.paid", {})
        for event_id in (generated, generated_by_publish):
            assert re.fullmatch(r"evt_[0-9a-f]{32}", event_id), event_id
        with pytest.raises(asyncpg.UniqueViolationError):
            await dispatcher.publish(conn, "order.paid", {}, event_id="by-hand")
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.fetchval(statement, "order.paid", "{}", None, None, "published", None, None)
