"""Tracing end to end: a real OTLP/HTTP endpoint (tests/otlp.py), real receivers, a real
dispatcher. The trace that was active when an event was published continues through every
attempt to the receiver; retries are siblings; a replay is linked to the original; routing
links its events; a malformed stored context starts a new trace; nothing secret is exported.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

import dispatcher
from dispatcher import config, ports, tracing
from dispatcher import receiver as receiver_toolkit
from dispatcher.agent import steps
from dispatcher.db import management, repository
from tests import otlp, support
from tests.conftest import Running
from tests.integration.test_agent_flow import start_agent

__all__ = ["start_agent"]  # the fixture, imported for pytest

SECRET = "whsec_" + "dHJhY2luZy1zZWNyZXQtMDEyMzQ1Njc4OQ=="
PAYLOAD_MARKER = "payload-marker-7f3a9c"
URL_PASSWORD = "url-password-51b2"
URL_TOKEN = "url-token-c94e"
VALID_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def collector() -> AsyncIterator[otlp.Collector]:
    c = await otlp.Collector().start()
    yield c
    await c.stop()


@pytest.fixture
def traced(start_dispatcher: Any, collector: otlp.Collector) -> Any:
    """Start in-process dispatchers that export to ``collector`` every 50 ms."""

    async def start(**changes: Any) -> Running:
        settings = config.TracingSettings(endpoint=collector.url, export_delay_seconds=0.05)
        running: Running = await start_dispatcher(tracing=settings, **changes)
        return running

    return start


# The application's own tracer: not the global provider (the test process is shared).
APP_TRACER = TracerProvider().get_tracer("shop")


async def _subscribe(pool: Any, url: str, **extra: Any) -> str:
    sub = await repository.Repository(pool).create_subscription(
        url=url, event_types=["order.*"], secret=SECRET, **extra
    )
    return str(sub["id"])


async def _publish_in_span(pool: Any, event_type: str = "order.paid") -> tuple[str, str, str]:
    """Publish inside an application span → (event id, trace id, span id)."""
    with APP_TRACER.start_as_current_span("checkout") as span:
        async with pool.acquire() as conn:
            event_id = await dispatcher.publish(conn, event_type, {"marker": PAYLOAD_MARKER})
        ctx = span.get_span_context()
    return event_id, f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


async def test_publish_inside_a_span_continues_to_the_attempt_and_the_receiver(
    pool: Any, receiver: support.Receiver, traced: Any, collector: otlp.Collector
) -> None:
    url = receiver.url.replace("127.0.0.1", f"user:{URL_PASSWORD}@127.0.0.1") + f"?t={URL_TOKEN}"
    sub = await _subscribe(pool, url)
    await traced()
    event_id, trace_id, app_span_id = await _publish_in_span(pool)
    stored = await pool.fetchval(
        "SELECT traceparent FROM webhook_outbox WHERE event_id = $1", event_id
    )
    assert stored.startswith(f"00-{trace_id}-{app_span_id}-")
    assert int(stored[-2:], 16) & 1  # sampled

    (attempt,) = await collector.wait_attempts(event_id, 1)
    assert (attempt.trace_id, attempt.parent_span_id) == (trace_id, app_span_id)
    assert attempt.name == "POST"
    assert attempt.service == "dispatcher"
    assert attempt.status_code != 2
    a = attempt.attributes
    assert a["http.request.method"] == "POST"
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == receiver.port
    assert a["url.full"] == f"http://127.0.0.1:{receiver.port}/hook?t=REDACTED"
    assert a["http.response.status_code"] == 200
    assert "error.type" not in a
    assert a["webhook.event_id"] == event_id
    assert a["webhook.event_type"] == "order.paid"
    assert a["webhook.subscription"] == sub
    assert a["webhook.attempt"] == 1
    assert a["webhook.outcome"] == "success"

    (request,) = receiver.requests
    assert attempt.is_parent_in(request.headers["traceparent"])

    # The routing batch that routed it links the event's context.
    await support.wait_for(
        lambda: any(
            (link.trace_id, link.span_id) == (trace_id, app_span_id)
            for route in collector.routes()
            for link in route.links
        ),
        message="a routing span linking the event",
    )
    (route,) = [r for r in collector.routes() if any(x.trace_id == trace_id for x in r.links)]
    assert route.kind == otlp.INTERNAL
    assert route.parent_span_id == ""
    assert route.attributes["webhook.route.routed"] >= 1


async def test_retries_are_siblings_under_the_events_parent(
    pool: Any, receiver: support.Receiver, traced: Any, collector: otlp.Collector
) -> None:
    receiver.respond = lambda n, _h, _b: (500 if n < 2 else 200, {}, 0.0)
    await _subscribe(pool, receiver.url)
    await traced()
    event_id, trace_id, app_span_id = await _publish_in_span(pool)

    spans = await collector.wait_attempts(event_id, 3)
    assert [s.attributes["webhook.attempt"] for s in spans] == [1, 2, 3]
    assert {(s.trace_id, s.parent_span_id) for s in spans} == {(trace_id, app_span_id)}
    assert len({s.span_id for s in spans}) == 3
    failed, ok = spans[:2], spans[2]
    for s in failed:
        assert s.attributes["http.response.status_code"] == 500
        assert s.attributes["error.type"] == "500"
        assert s.attributes["webhook.outcome"] == "http_5xx"
        assert s.status_code == 2  # ERROR
    assert ok.attributes["webhook.outcome"] == "success"
    assert ok.status_code != 2
    # Each request carried its own attempt's span.
    assert len(receiver.requests) == 3
    for request, span in zip(receiver.requests, spans, strict=True):
        assert span.is_parent_in(request.headers["traceparent"])


async def test_a_replay_is_a_new_trace_linked_to_the_original(
    pool: Any, receiver: support.Receiver, traced: Any, collector: otlp.Collector
) -> None:
    receiver.respond = lambda _n, _h, _b: (400, {}, 0.0)  # dead after max_4xx_attempts (2)
    sub = await _subscribe(pool, receiver.url)
    running = await traced()
    event_id, trace_id, app_span_id = await _publish_in_span(pool)
    delivery_id = await support.wait_for(
        lambda: pool.fetchval(
            "SELECT id FROM webhook_deliveries WHERE subscription_id = $1 AND state = 'dead'",
            sub,
        ),
        message="the delivery is dead",
    )
    receiver.respond = lambda _n, _h, _b: (200, {}, 0.0)
    repo = running.dispatcher.repo
    await management.Management(pool, repo).retry_delivery(delivery_id)

    spans = await collector.wait_attempts(event_id, 3)
    originals, replay = spans[:2], spans[2]
    assert all(s.trace_id == trace_id for s in originals)
    assert replay.attributes["webhook.manual"] is True
    assert replay.trace_id != trace_id
    assert replay.parent_span_id == ""
    (link,) = replay.links
    assert (link.trace_id, link.span_id) == (trace_id, app_span_id)
    assert link.attributes == {"webhook.link": "replay_of"}
    assert replay.is_parent_in(receiver.requests[-1].headers["traceparent"])


@pytest.mark.parametrize(
    "stored",
    [
        "garbage",
        "00-00000000000000000000000000000000-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ],
)
async def test_a_malformed_traceparent_is_delivered_in_a_new_trace(
    stored: str,
    pool: Any,
    receiver: support.Receiver,
    traced: Any,
    collector: otlp.Collector,
) -> None:
    await _subscribe(pool, receiver.url)
    await traced()
    # A plain-SQL producer wrote nonsense: the column has no CHECK on purpose.
    event_id = await pool.fetchval(
        "INSERT INTO webhook_outbox (event_type, payload, traceparent, tracestate) "
        "VALUES ('order.paid', '{}', $1, 'not a valid tracestate\u00e9') RETURNING event_id",
        stored,
    )
    (attempt,) = await collector.wait_attempts(event_id, 1)
    assert attempt.parent_span_id == ""
    assert attempt.links == ()
    assert attempt.trace_id not in stored.lower()
    assert attempt.attributes["webhook.outcome"] == "success"
    (request,) = receiver.requests
    assert attempt.is_parent_in(request.headers["traceparent"])
    assert "tracestate" not in request.headers


async def test_an_unsampled_parent_is_propagated_but_not_recorded(
    pool: Any, receiver: support.Receiver, traced: Any, collector: otlp.Collector
) -> None:
    await _subscribe(pool, receiver.url)
    await traced()
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    async with pool.acquire() as conn:
        event_id = await dispatcher.publish(
            conn, "order.paid", {}, traceparent=parent, tracestate="vendor=abc"
        )
    await support.wait_for(lambda: receiver.requests, message="delivery")
    header = receiver.requests[0].headers["traceparent"]
    assert re.fullmatch(r"00-4bf92f3577b34da6a3ce929d0e0e4736-[0-9a-f]{16}-00", header)
    assert receiver.requests[0].headers["tracestate"] == "vendor=abc"
    # The routing span still exports; it is the proof that the exporter ran after delivery.
    await support.wait_for(
        lambda: any(
            link.span_id == "00f067aa0ba902b7" for r in collector.routes() for link in r.links
        ),
        message="routing span",
    )
    assert collector.attempts(event_id) == []


async def test_no_span_or_header_carries_a_secret_a_signature_or_the_payload(
    pool: Any, receiver: support.Receiver, traced: Any, collector: otlp.Collector
) -> None:
    receiver.respond = lambda n, _h, _b: (503 if n == 0 else 200, {}, 0.0)
    url = receiver.url.replace("127.0.0.1", f"user:{URL_PASSWORD}@127.0.0.1") + f"?t={URL_TOKEN}"
    await _subscribe(pool, url, headers={"X-Api-Key": "header-secret-9d1e"})
    running = await traced()
    event_id, _, _ = await _publish_in_span(pool)
    await collector.wait_attempts(event_id, 2)
    assert isinstance(running.dispatcher.tracer, tracing.Tracing)
    assert await running.dispatcher.tracer.flush()
    signatures = [r.headers["webhook-signature"] for r in receiver.requests]
    exported = b"".join(collector.bodies)
    forbidden = [
        SECRET,
        SECRET.removeprefix("whsec_"),
        PAYLOAD_MARKER,
        URL_PASSWORD,
        URL_TOKEN,
        "header-secret-9d1e",
        *signatures,
        *(s.split(",", 1)[1] for s in " ".join(signatures).split()),
    ]
    for text in forbidden:
        assert text.encode() not in exported, text
    trace_headers = [
        f"{r.headers.get('traceparent')} {r.headers.get('tracestate', '')}"
        for r in receiver.requests
    ]
    for text in forbidden:
        assert all(text not in h for h in trace_headers), text


async def test_the_receiver_toolkit_continues_the_trace(
    pool: Any, traced: Any, collector: otlp.Collector
) -> None:
    from opentelemetry import trace

    seen: list[tuple[str, str]] = []

    async def process(_payload: dict[str, Any], _headers: Any) -> None:
        ctx = trace.get_current_span().get_span_context()
        seen.append((f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"))

    verifier = receiver_toolkit.Verifier(SECRET)
    handler = receiver_toolkit.webhook_handler(
        verifier, receiver_toolkit.MemoryIdempotencyStore(), process
    )
    web_app = web.Application()
    web_app.router.add_post("/hook", handler)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        await _subscribe(pool, f"http://127.0.0.1:{port}/hook")
        await traced()
        event_id, trace_id, _ = await _publish_in_span(pool)
        (attempt,) = await collector.wait_attempts(event_id, 1)
        assert attempt.attributes["http.response.status_code"] == 200
        # Inside ``process`` the current trace is the dispatcher's: the attempt span is the
        # remote parent (no SDK configured here, so the server span is not recording).
        assert seen == [(trace_id, attempt.span_id)]
    finally:
        await runner.cleanup()


async def test_the_delivery_latency_exemplar_names_the_trace(
    pool: Any, receiver: support.Receiver, traced: Any, collector: otlp.Collector
) -> None:
    await _subscribe(pool, receiver.url)
    running = await traced()
    event_id, trace_id, _ = await _publish_in_span(pool)
    (attempt,) = await collector.wait_attempts(event_id, 1)
    metrics_url = f"http://127.0.0.1:{running.dispatcher.bound_port}/metrics"
    async with aiohttp.ClientSession() as http:
        async with http.get(
            metrics_url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        ) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            openmetrics = await resp.text()
        async with http.get(metrics_url) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            classic = await resp.text()
    exemplars = re.findall(
        r'^dispatcher_delivery_latency_seconds_bucket\{.*\} \S+ # \{span_id="([0-9a-f]{16})",'
        r'trace_id="([0-9a-f]{32})"\}',
        openmetrics,
        re.MULTILINE,
    )
    assert (attempt.span_id, trace_id) in exemplars
    assert openmetrics.rstrip().endswith("# EOF")
    assert trace_id not in classic


async def test_the_cli_reads_opentelemetrys_variables(
    dsn: str, pool: Any, receiver: support.Receiver, collector: otlp.Collector, tmp_path: Path
) -> None:
    await _subscribe(pool, receiver.url)
    proc = support.spawn_dispatcher(
        dsn,
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.base_url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "webhooks-test",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        },
        log_path=tmp_path / "dispatcher.log",
    )
    try:
        event_id, trace_id, _ = await _publish_in_span(pool)
        (attempt,) = await collector.wait_attempts(event_id, 1, timeout=30)
        assert attempt.trace_id == trace_id
        assert attempt.service == "webhooks-test"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0


async def _submit_job(agent: Any, webhook_url: str, headers: dict[str, str]) -> str:
    body = {
        "prospects": [{"email": "ana@stripe.com"}, {"email": "raj@acme.io"}],
        "criteria": {"min_company_size": 50, "industry": "tech"},
        "webhook_url": webhook_url,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{agent.url}/api/v1/lead-qualification", json=body, headers=headers) as resp,
    ):
        assert resp.status == 202, await resp.text()
        job_id: str = (await resp.json())["job_id"]
        return job_id


async def test_the_agents_callbacks_continue_the_callers_trace(
    pool: Any,
    receiver: support.Receiver,
    traced: Any,
    collector: otlp.Collector,
    start_agent: Any,
) -> None:
    await traced()
    agent = await start_agent()
    with APP_TRACER.start_as_current_span("qualify leads") as caller:
        ctx = caller.get_span_context()
        trace_id, span_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        incoming = {"traceparent": f"00-{trace_id}-{span_id}-01", "tracestate": "shop=1"}
        job_id = await _submit_job(agent, receiver.url, incoming)
    spans: list[otlp.Span] = []
    for key in ("enrichment", "criteria", "scoring"):
        spans += await collector.wait_attempts(steps.event_id(job_id, key), 1)
    assert {(s.trace_id, s.parent_span_id) for s in spans} == {(trace_id, span_id)}
    assert [s.attributes["webhook.event_type"] for s in spans] == [
        steps.EVENT_PROGRESS,
        steps.EVENT_PROGRESS,
        steps.EVENT_COMPLETE,
    ]
    for request in receiver.requests:
        assert request.headers["traceparent"].startswith(f"00-{trace_id}-")
        assert request.headers["tracestate"] == "shop=1"


async def test_the_agent_ignores_a_malformed_traceparent(
    pool: Any, receiver: support.Receiver, start_agent: Any
) -> None:
    agent = await start_agent()
    job_id = await _submit_job(agent, receiver.url, {"traceparent": "00-nonsense-01"})
    await support.wait_for(
        lambda: pool.fetchval(
            "SELECT count(*) = 3 FROM webhook_outbox WHERE event_id LIKE $1", f"{job_id}:%"
        ),
        message="three callbacks published",
    )
    stored = await pool.fetch(
        "SELECT traceparent, tracestate FROM webhook_outbox WHERE event_id LIKE $1", f"{job_id}:%"
    )
    assert [tuple(r) for r in stored] == [(None, None)] * 3


RECORDING_RECEIVER = """
import asyncio, datetime, json, time
import aiohttp, standardwebhooks
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from dispatcher import receiver

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # the receiving application's own OpenTelemetry setup
SECRET = {secret!r}
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

async def main():
    inside = []

    async def process(payload, headers):
        inside.append(trace.get_current_span().get_span_context())

    app = web.Application()
    app.router.add_post("/hook", receiver.webhook_handler(
        receiver.Verifier(SECRET), receiver.MemoryIdempotencyStore(), process))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    body = json.dumps({{"n": 1}}).encode()
    now = int(time.time())
    signer = standardwebhooks.Webhook(SECRET)
    signature = signer.sign("evt_1", datetime.datetime.fromtimestamp(now), body.decode())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{{port}}/hook", data=body, headers={{
            "webhook-id": "evt_1", "webhook-timestamp": str(now), "webhook-signature": signature,
            "content-type": "application/json", "traceparent": PARENT, "tracestate": "v=1",
        }}) as resp:
            assert resp.status == 200, await resp.text()
    await runner.cleanup()
    (span,) = exporter.get_finished_spans()
    assert span.kind == trace.SpanKind.SERVER, span.kind
    assert f"{{span.context.trace_id:032x}}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert f"{{span.parent.span_id:016x}}" == "00f067aa0ba902b7"
    assert span.parent.is_remote
    assert span.context.trace_state.get("v") == "1"
    assert span.attributes["http.response.status_code"] == 200
    assert inside == [span.context], (inside, span.context)
    print("ok")

asyncio.run(main())
"""


def test_the_receiver_toolkit_records_a_server_span_under_the_applications_provider() -> None:
    """With the receiving application's own SDK set up globally (a separate process: the
    global provider can be set once), the handler records a SERVER span whose parent is the
    dispatcher's attempt span, and ``process`` runs inside it."""
    result = subprocess.run(
        [sys.executable, "-c", RECORDING_RECEIVER.format(secret=SECRET)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=support.ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


async def test_publish_refuses_a_malformed_explicit_context_and_writes_nothing(pool: Any) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(ValueError, match="not a W3C traceparent"):
            await dispatcher.publish(conn, "order.paid", {}, traceparent="00-abc-def-01")
        with pytest.raises(ValueError, match="tracestate"):
            await dispatcher.publish(
                conn, "order.paid", {}, traceparent=VALID_PARENT, tracestate="x" * 600
            )
        # Outside any span and without arguments: no context stored.
        event_id = await dispatcher.publish(conn, "order.paid", {})
    assert await pool.fetchval("SELECT count(*) FROM webhook_outbox") == 1
    stored = await pool.fetchrow(
        "SELECT traceparent, tracestate FROM webhook_outbox WHERE event_id = $1", event_id
    )
    assert tuple(stored) == (None, None)


async def test_an_unreachable_collector_delays_neither_delivery_nor_shutdown(
    dsn: str, pool: Any, receiver: support.Receiver, tmp_path: Path
) -> None:
    await _subscribe(pool, receiver.url)
    dead_port = ports.free_port()  # nothing listens there
    proc = support.spawn_dispatcher(
        dsn,
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{dead_port}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        },
        log_path=tmp_path / "dispatcher.log",
    )
    try:
        ids = [(await _publish_in_span(pool))[0] for _ in range(20)]
        await support.wait_for(
            lambda: sorted(receiver.ids()) == sorted(ids), timeout=30, message="all delivered"
        )
        # Let the exporter hit the dead collector (it retries for up to 30 s per batch).
        await support.wait_for(
            lambda: "Transient error" in (tmp_path / "dispatcher.log").read_text(),
            timeout=15,
            message="a failed export",
        )
    finally:
        stopping = asyncio.get_running_loop().time()
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 40)
    took = asyncio.get_running_loop().time() - stopping
    assert proc.returncode == 0
    # The drain (nothing in flight) plus the bounded span flush; the SDK alone would wait 30 s.
    assert took < tracing.SHUTDOWN_TIMEOUT_SECONDS + 8, took
