"""SSRF canary: a real aiohttp client must never reach a loopback server it is not allowed to.

A real aiohttp server on 127.0.0.1 counts TCP connections (the count is taken in the
protocol factory, so a connection is seen even if no request follows). A real ClientSession
with the guarded resolver then tries to reach it through many spellings of 127.0.0.1 and
localhost, calling `check_request_host` first exactly as the sender does. Zero connections
must arrive. With 127.0.0.1/32 allow-listed, a plain request must arrive, which proves the
canary would have counted. All traffic stays on loopback; no name reaches a DNS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import aiohttp.abc
import aiohttp.helpers
import pytest
import yarl
from aiohttp import web

from dispatcher import ssrf

TIMEOUT = aiohttp.ClientTimeout(total=3, connect=2)


@dataclass
class Canary:
    port: int
    connections: int = 0
    requests: int = 0
    servers: list[asyncio.Server] = field(default_factory=list)


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    async def hit(request: web.Request) -> web.Response:
        state.requests += 1
        return web.Response(text="canary")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hit)
    runner = web.AppRunner(app)
    await runner.setup()
    server = runner.server
    assert server is not None

    def counting_factory() -> asyncio.Protocol:
        state.connections += 1
        return server()

    loop = asyncio.get_running_loop()
    first = await loop.create_server(counting_factory, "127.0.0.1", 0)
    port = first.sockets[0].getsockname()[1]
    state = Canary(port=port, servers=[first])
    # Also listen on [::1] with the same port where the host has IPv6 loopback, so IPv6
    # spellings of loopback would be counted too instead of just being refused.
    with contextlib.suppress(OSError):
        state.servers.append(await loop.create_server(counting_factory, "::1", port))
    try:
        yield state
    finally:
        for listener in state.servers:
            listener.close()
        await runner.cleanup()
        for listener in state.servers:
            await listener.wait_closed()


def loopback_spellings(port: int) -> list[str]:
    hosts = [
        "127.0.0.1",
        "127.1",
        "127.0.1",
        "127.000.000.001",
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "0x7f.1",
        "0x7f.0.1",
        "0x7f.0.0.1",
        "0x7f.0x0.0x0.0x1",
        "0x00007f.0x000001",
        "0177.0.0.1",
        "0177.1",
        "0177.0.1",
        "017700000001",
        "0000177.0.0.1",
        "127.0x0.0.01",
        "127.0.0.1.",
        "127.1.",
        "0x7f.1.",
        "127.0.0.2..",
        "127.0.0.1..",
        "127.1...",
        "0x7f.1..",
        "2130706433..",
        "localhost..",
        "127.0.0.1%2e",
        "\u2460\u2461\u2466.0.0.1",
        "127\u30020\u30020\u30021",
        "127.0.0.2",
        "127.255.255.254",
        "0.0.0.0",
        "0",
        "0x0",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:7f00:1]",
        "[::FFFF:7F00:0001]",
        "[::127.0.0.1]",
        "[::1]",
        "[0:0:0:0:0:0:0:1]",
        "[::]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
        "localhost",
        "LOCALHOST",
        "LocalHost",
        "localhost.",
        "foo.localhost",
        "api.localhost.",
    ]
    urls = [f"http://{host}:{port}/hook" for host in hosts]
    urls += [f"https://127.0.0.1:{port}/", f"http://0x7f.1:{port}/?next=/admin"]
    return urls


async def sender_attempt(
    session: aiohttp.ClientSession, url: str, policy: ssrf.AddressPolicy
) -> None:
    """What the sender does per attempt: literal check, then a POST that follows no redirect."""
    ssrf.check_request_host(url, policy)
    async with session.post(url, json={"probe": True}, allow_redirects=False) as response:
        await response.read()


def guarded_session(
    policy: ssrf.AddressPolicy, inner: aiohttp.abc.AbstractResolver | None = None
) -> tuple[aiohttp.ClientSession, ssrf.GuardedResolver]:
    resolver = ssrf.build_connector_resolver(policy, inner)
    # No DNS cache, so every attempt goes back through the guarded resolver.
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    return aiohttp.ClientSession(connector=connector, timeout=TIMEOUT), resolver


async def test_control_unguarded_client_reaches_the_canary(canary: Canary) -> None:
    """Without the guard these spellings do reach loopback, so blocking them is meaningful."""
    hosts = ["127.0.0.1", "0x7f.1", "0x7f000001", "127.0x0.0.01", "localhost"]
    # force_close: one connection per request, so the TCP-level count equals the requests.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        for host in hosts:
            async with session.get(f"http://{host}:{canary.port}/") as response:
                assert response.status == 200, host
    assert canary.connections == len(hosts)


async def test_every_loopback_spelling_is_blocked_and_the_canary_sees_nothing(
    canary: Canary,
) -> None:
    policy = ssrf.AddressPolicy()
    urls = loopback_spellings(canary.port)
    assert len(urls) >= 40
    session, resolver = guarded_session(policy)
    try:
        for url in urls:
            with pytest.raises(ssrf.BlockedAddressError) as info:
                await sender_attempt(session, url, policy)
            assert ssrf.is_blocked_error(info.value), url
    finally:
        await session.close()
        await resolver.close()
    assert canary.connections == 0
    assert canary.requests == 0


def aiohttp_route(url: str) -> str:
    """How aiohttp 3.14 handles the host: via the resolver, rejected, or connected directly."""
    host = yarl.URL(url).raw_host or ""
    if not aiohttp.helpers.is_ip_address(host):
        return "resolver"
    if ":" not in host and not aiohttp.helpers.is_canonical_ipv4_address(host):
        return "rejected"
    return "direct"


async def test_resolver_alone_blocks_what_aiohttp_resolves(canary: Canary) -> None:
    """Without the per-attempt check: every host aiohttp sends to the resolver is stopped.

    Hosts aiohttp connects to directly (canonical literals) are skipped here; they are the
    reason `check_request_host` exists.
    """
    policy = ssrf.AddressPolicy()
    session, resolver = guarded_session(policy)
    routes = {"resolver": 0, "rejected": 0}
    try:
        for url in loopback_spellings(canary.port):
            route = aiohttp_route(url)
            if route == "direct":
                continue
            routes[route] += 1
            with pytest.raises((ssrf.BlockedAddressError, aiohttp.InvalidUrlClientError)) as info:
                async with session.post(url, allow_redirects=False):
                    pass
            if route == "resolver":
                # Reaches the caller unwrapped in aiohttp 3.14; is_blocked_error covers both.
                assert isinstance(info.value, ssrf.BlockedAddressError), url
            assert ssrf.is_blocked_error(info.value) == (route == "resolver"), url
    finally:
        await session.close()
        await resolver.close()
    assert routes["resolver"] >= 15
    assert canary.connections == 0


class RebindingResolver(aiohttp.abc.AbstractResolver):
    """A name whose DNS answer has been switched to loopback after it was configured."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        self.lookups += 1
        return [
            {
                "hostname": host,
                "host": self.answer,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


async def test_dns_rebinding_to_loopback_is_blocked(canary: Canary) -> None:
    policy = ssrf.AddressPolicy()
    url = f"http://hooks.customer.test:{canary.port}/hook"
    ssrf.check_url(url, policy)  # a name: passes at creation time
    inner = RebindingResolver("127.0.0.1")
    session, resolver = guarded_session(policy, inner)
    try:
        for _ in range(3):
            with pytest.raises(ssrf.BlockedAddressError) as info:
                await sender_attempt(session, url, policy)
            assert "hooks.customer.test" in str(info.value)
    finally:
        await session.close()
        await resolver.close()
    assert inner.lookups == 3
    assert canary.connections == 0


async def test_allow_listed_loopback_reaches_the_canary(canary: Canary) -> None:
    policy = ssrf.AddressPolicy.from_strings(["127.0.0.1/32"])
    session, resolver = guarded_session(policy)
    try:
        ssrf.check_url(f"http://127.0.0.1:{canary.port}/", policy)
        await sender_attempt(session, f"http://127.0.0.1:{canary.port}/hook", policy)
        assert canary.connections == 1
        # Through the real default resolver: localhost resolves, 127.0.0.1 is kept.
        await sender_attempt(session, f"http://localhost:{canary.port}/hook", policy)
        with pytest.raises(ssrf.BlockedAddressError):
            await sender_attempt(session, f"http://127.0.0.2:{canary.port}/hook", policy)
    finally:
        await session.close()
        await resolver.close()
    assert canary.requests == 2
    assert canary.connections == 2
