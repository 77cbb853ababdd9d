"""The sender against a real HTTP server on 127.0.0.1 (no database): what the shared session
keeps between deliveries, how a capped response body ends its connection, and the attempt
deadline (``asyncio.timeout``'s semantics on a timer shared by the Sender's attempts)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
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
        self.hanging = 0
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if request.path.startswith("/hang"):
            self.hanging += 1
            await self.release.wait()
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
    srv.release.set()
    await runner.cleanup()


@contextlib.asynccontextmanager
async def _sender(**kw: Any) -> AsyncIterator[sender.Sender]:
    """A Sender reaching ``HOST`` (127.0.0.1) over one connection unless told otherwise."""
    policy = ssrf.AddressPolicy.from_strings(["127.0.0.0/8"])
    resolver = ssrf.build_connector_resolver(policy, support.StaticResolver({HOST: ["127.0.0.1"]}))
    session = sender.build_session(max_connections=kw.pop("max_connections", 1), resolver=resolver)
    options: dict[str, Any] = {
        "request_timeout_seconds": 5,
        "connect_timeout_seconds": 2,
        "response_max_bytes": 1024,
        "response_log_bytes": 64,
    } | kw
    try:
        yield sender.Sender(session, signing.SignerRegistry.load(), **options)
    finally:
        await session.close()
        await resolver.close()


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
    async with _sender() as http:
        srv.set_cookie = True
        first = await http.send(_job(f"http://{HOST}:{port}/a", "s1"))
        second = await http.send(_job(f"http://{HOST}:{port}/b", "s2"))
    assert first.verdict is second.verdict is model.Verdict.DELIVERED
    assert "Cookie" not in srv.requests[1][0]


async def test_a_body_over_the_cap_is_cut_and_a_connection_with_unread_data_dropped(
    server: tuple[Server, int],
) -> None:
    srv, port = server
    url = f"http://{HOST}:{port}/hook"
    async with _sender(response_max_bytes=16, response_log_bytes=8) as http:
        srv.body = b"x" * 16  # exactly the cap: read whole, the connection is kept
        at_cap = await http.send(_job(url))
        kept = await http.send(_job(url))
        # Far over the cap: the client stops reading long before the end, and the rest still
        # on the wire makes the connection unusable, so it is closed.
        srv.body = b"y" * (8 << 20)
        over = await http.send(_job(url))
        after = await http.send(_job(url))
    assert at_cap.response_excerpt == "x" * 8
    assert over.response_excerpt == "y" * 8
    assert kept.verdict is after.verdict is model.Verdict.DELIVERED
    connections = [client_port for _headers, client_port in srv.requests]
    assert connections[0] == connections[1] == connections[2]
    assert connections[3] != connections[2]


async def test_each_attempt_ends_at_its_own_deadline_as_a_timeout(
    server: tuple[Server, int],
) -> None:
    srv, port = server
    base = f"http://{HOST}:{port}"
    async with _sender(request_timeout_seconds=0.3, max_connections=4) as http:
        # The first attempt to start finishes first: the shared timer, armed for its deadline,
        # must then carry over to the hanging one behind it, and to one started later still.
        quick = asyncio.create_task(http.send(_job(f"{base}/ok")))
        hung = asyncio.create_task(http.send(_job(f"{base}/hang/1")))
        assert (await quick).verdict is model.Verdict.DELIVERED
        first = await hung
        second = await http.send(_job(f"{base}/hang/2"))
        # The deadline's cancellation was taken back: this task carries on undisturbed.
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        await asyncio.sleep(0)
        after = await http.send(_job(f"{base}/ok"))
    for result in (first, second):
        assert result.outcome is model.Outcome.TIMEOUT
        assert result.error == "request deadline exceeded"
    assert srv.hanging == 2
    assert after.verdict is model.Verdict.DELIVERED


async def test_a_cancelled_attempt_stays_cancelled_not_timed_out(
    server: tuple[Server, int],
) -> None:
    # The claimer's drain cancels attempts still running at shutdown: that must reach it as a
    # cancellation, not be turned into a timeout outcome.
    srv, port = server
    async with _sender(request_timeout_seconds=30, max_connections=2) as http:
        attempt = asyncio.create_task(http.send(_job(f"http://{HOST}:{port}/hang")))
        await support.wait_for(lambda: srv.hanging == 1, message="the request on the wire")
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        after = await http.send(_job(f"http://{HOST}:{port}/ok"))
    assert after.verdict is model.Verdict.DELIVERED


@pytest.mark.parametrize("direct", [True, False])
async def test_both_request_paths_send_the_same_request(
    server: tuple[Server, int], monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """The direct path (``Sender._request``, used when the installed aiohttp fits it) and
    ClientSession's own send the same headers and body."""
    srv, port = server
    if direct:
        assert sender.DIRECT_REQUESTS, "the installed aiohttp no longer fits the direct path"

        async def refused(*_a: Any, **_kw: Any) -> None:
            raise AssertionError("ClientSession._request used")

        monkeypatch.setattr(aiohttp.ClientSession, "_request", refused)
    async with _sender(direct=direct, clock=lambda: 1_700_000_000.0) as http:
        result = await http.send(_job(f"http://{HOST}:{port}/a"))
    assert result.verdict is model.Verdict.DELIVERED
    headers = srv.requests[0][0]
    assert headers["Host"] == f"{HOST}:{port}"
    assert headers["Content-Length"] == "2"
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept-Encoding"] == "identity"
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == "1700000000"
    assert sorted(k.lower() for k in headers) == sorted(
        [
            "host",
            "accept",
            "accept-encoding",
            "user-agent",
            "content-length",
            "content-type",
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
        ]
    )


@pytest.mark.parametrize("direct", [True, False])
async def test_a_post_on_a_kept_alive_connection_found_closed_is_not_repeated(
    direct: bool,
) -> None:
    """The receiver drops a kept-alive connection when the next request arrives on it. A POST
    is not idempotent: neither path repeats it on its own (the attempt fails as a connect
    error and is retried with backoff); the next one goes on a new connection."""
    seen: list[int] = []
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        on_this_connection = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                on_this_connection += 1
                seen.append(on_this_connection)
                if on_this_connection == 2:
                    return  # closed without an answer
                writer.write(ok)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with _sender(direct=direct) as http:
            first = await http.send(_job(f"http://{HOST}:{port}/a"))
            second = await http.send(_job(f"http://{HOST}:{port}/a"))
            third = await http.send(_job(f"http://{HOST}:{port}/a"))
    finally:
        srv.close()
        await srv.wait_closed()
    assert first.verdict is third.verdict is model.Verdict.DELIVERED
    assert (second.verdict, second.outcome) == (
        model.Verdict.RETRYABLE,
        model.Outcome.CONNECT_ERROR,
    )
    assert seen == [1, 2, 1]  # the second request, dropped; the third on a new connection


@pytest.mark.parametrize("url", ["ftp://{host}:{port}/x", "unix://{host}/x", "http:///x", "/x"])
async def test_a_row_with_an_unusable_url_fails_alone_the_same_on_both_paths(url: str) -> None:
    """A URL the API would refuse but a hand-written row can hold: the attempt fails with the
    same outcome on both paths, no connection is opened, and nothing raises."""
    connections: list[int] = []

    async def count(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    srv = await asyncio.start_server(count, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    results = []
    try:
        for direct in (True, False):
            async with _sender(direct=direct) as http:
                results.append(await http.send(_job(url.format(host=HOST, port=port))))
    finally:
        srv.close()
        await srv.wait_closed()
    direct_result, session_result = results
    assert direct_result.verdict is model.Verdict.RETRYABLE
    assert (direct_result.outcome, direct_result.error) == (
        session_result.outcome,
        session_result.error,
    )
    assert connections == []
