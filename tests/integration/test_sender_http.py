"""The sender against a real HTTP server on 127.0.0.1 (no database): what the shared session
keeps between deliveries, and how a capped response body ends its connection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from dispatcher import model, sender, signing, ssrf
from tests import support

HOST = "hooks.example.test"
SECRET = signing.generate_secret()


class Server:
    """Answers every POST with ``body``; records each request's headers and the client's
    port (one per connection)."""

    def __init__(self) -> None:
        self.body = b"ok"
        self.set_cookie = False
        self.requests: list[tuple[dict[str, str], int]] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        _host, client_port = request.transport.get_extra_info("peername")[:2]
        self.requests.append((dict(request.headers), client_port))
        resp = web.Response(body=self.body)
        if self.set_cookie:
            resp.set_cookie("receiver_session", "s3cr3t", path="/")
        return resp


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, int]]:
    srv = Server()
    app = web.Application()
    app.router.add_post("/{tail:.*}", srv.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield srv, port
    await runner.cleanup()


def _sender(**kw: Any) -> tuple[sender.Sender, Any]:
    policy = ssrf.AddressPolicy.from_strings(["127.0.0.0/8"])
    resolver = ssrf.build_connector_resolver(policy, support.StaticResolver({HOST: ["127.0.0.1"]}))
    session = sender.build_session(max_connections=1, resolver=resolver)
    options: dict[str, Any] = {
        "request_timeout_seconds": 5,
        "connect_timeout_seconds": 2,
        "response_max_bytes": 1024,
        "response_log_bytes": 64,
    } | kw
    return sender.Sender(session, signing.SignerRegistry.load(), **options), session


def _job(url: str, subscription: str = "s1") -> model.Job:
    return model.Job(
        delivery_id=1,
        lease_token=1,
        attempt=1,
        subscription_id=subscription,
        url=url,
        event_id="evt_1",
        event_type="a.b",
        body=b"{}",
        secrets=(SECRET,),
        signature_header=None,
        signers=(),
        headers={},
        event_created_at=0.0,
    )


async def test_a_receivers_cookie_is_never_sent_back(server: tuple[Server, int]) -> None:
    # One session serves every subscription: a cookie one receiver sets would otherwise go
    # out with the next delivery to that host, whichever subscription (tenant) it is for.
    srv, port = server
    http, session = _sender()
    try:
        srv.set_cookie = True
        first = await http.send(_job(f"http://{HOST}:{port}/a", "s1"))
        second = await http.send(_job(f"http://{HOST}:{port}/b", "s2"))
    finally:
        await session.close()
    assert first.verdict is second.verdict is model.Verdict.DELIVERED
    assert "Cookie" not in srv.requests[1][0]


async def test_a_body_over_the_cap_is_cut_and_a_connection_with_unread_data_dropped(
    server: tuple[Server, int],
) -> None:
    srv, port = server
    http, session = _sender(response_max_bytes=16, response_log_bytes=8)
    url = f"http://{HOST}:{port}/hook"
    try:
        srv.body = b"x" * 16  # exactly the cap: read whole, the connection is kept
        at_cap = await http.send(_job(url))
        kept = await http.send(_job(url))
        # Far over the cap: the client stops reading long before the end, and the rest still
        # on the wire makes the connection unusable, so it is closed.
        srv.body = b"y" * (8 << 20)
        over = await http.send(_job(url))
        after = await http.send(_job(url))
    finally:
        await session.close()
    assert at_cap.response_excerpt == "x" * 8
    assert over.response_excerpt == "y" * 8
    assert kept.verdict is after.verdict is model.Verdict.DELIVERED
    connections = [client_port for _headers, client_port in srv.requests]
    assert connections[0] == connections[1] == connections[2]
    assert connections[3] != connections[2]
