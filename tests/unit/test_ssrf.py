"""Unit tests for the SSRF guard: address policy, literal parsing, URL checks, resolver filter.

No network: the resolver tests use a fake inner resolver, which is the seam the guard wraps.
"""

from __future__ import annotations

import ipaddress
import socket

import aiohttp
import aiohttp.abc
import pytest
import yarl

from dispatcher import ssrf

DEFAULT = ssrf.AddressPolicy()

# (url, allowed under the default policy). Blocked entries spell out loopback, metadata and
# private addresses every way a resolver or URL parser might accept them.
URL_TABLE: list[tuple[str, bool]] = [
    # IPv4 loopback in inet_aton spellings
    ("http://127.0.0.1/", False),
    ("http://127.0.0.1:8080/hook", False),
    ("http://2130706433/", False),
    ("http://0x7f000001/", False),
    ("http://0x7f.1/", False),
    ("http://0X7F.0.0.1/", False),
    ("http://0x7f.0x0.0x0.0x1/", False),
    ("http://0177.0.0.1/", False),
    ("http://0177.1/", False),
    ("http://017700000001/", False),
    ("http://127.1/", False),
    ("http://127.0.1/", False),
    ("http://127.0.0.1./", False),
    ("http://127.0.0.2../", False),
    ("http://127.0.0.1.../", False),
    ("http://0x7f.1../", False),
    ("http://2130706433../", False),
    ("http://example.com../", False),
    ("http://a..example.com/", False),
    ("http://.example.com/", False),
    ("http://127.0.0.1%2e/", False),
    ("http://127.255.255.254/", False),
    ("http://\u2460\u2461\u2466.0.0.1/", False),
    ("http://127\u30020\u30020\u30021/", False),
    # IPv6 loopback / unspecified and IPv4 embedded in IPv6
    ("http://[::1]/", False),
    ("http://[0:0:0:0:0:0:0:1]/", False),
    ("http://[::]/", False),
    ("http://[::ffff:127.0.0.1]/", False),
    ("http://[::ffff:7f00:1]/", False),
    ("http://[::FFFF:7F00:1]/", False),
    ("http://[::127.0.0.1]/", False),
    ("http://[::ffff:0.0.0.0]/", False),
    ("http://[::ffff:a00:1]/", False),
    ("http://[64:ff9b::7f00:1]/", False),
    ("http://[64:ff9b::a9fe:a9fe]/", False),
    ("http://[64:ff9b:1::1]/", False),
    ("http://[2002:7f00:1::]/", False),
    ("http://[2002:a9fe:a9fe::1]/", False),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", False),
    # cloud metadata and link-local
    ("http://169.254.169.254/", False),
    ("http://169.254.169.254/latest/meta-data/", False),
    ("http://[::ffff:169.254.169.254]/", False),
    ("http://[fe80::1%25eth0]/", False),
    ("http://[fe80::1]/", False),
    # IPv6 non-global
    ("http://[fd00::1]/", False),
    ("http://[fc00::1]/", False),
    ("http://[fec0::1]/", False),
    ("http://[ff02::1]/", False),
    ("http://[2001:db8::1]/", False),
    ("http://[100::1]/", False),
    # IPv4 private, CGNAT, this-network, multicast, reserved, documentation, benchmarking
    ("http://100.64.0.1/", False),
    ("http://100.127.255.254/", False),
    ("http://10.0.0.1/", False),
    ("http://10.1/", False),
    ("http://172.16.0.1/", False),
    ("http://172.31.255.255/", False),
    ("http://192.168.1.1/", False),
    ("http://0.0.0.0/", False),
    ("http://0/", False),
    ("http://224.0.0.1/", False),
    ("http://239.255.255.250/", False),
    ("http://255.255.255.255/", False),
    ("http://240.0.0.1/", False),
    ("http://192.0.0.1/", False),
    ("http://192.0.2.1/", False),
    ("http://198.51.100.1/", False),
    ("http://203.0.113.1/", False),
    ("http://198.18.0.1/", False),
    ("http://198.19.255.255/", False),
    # localhost by name (RFC 6761)
    ("http://localhost/", False),
    ("http://LOCALHOST:9000/", False),
    ("http://localhost./", False),
    ("http://foo.localhost/", False),
    # global destinations
    ("http://8.8.8.8/", True),
    ("https://1.1.1.1/", True),
    ("http://134744072/", True),
    ("http://172.32.0.1/", True),
    ("http://100.128.0.1/", True),
    ("http://[2606:4700:4700::1111]/", True),
    ("http://[::ffff:8.8.8.8]/", True),
    ("http://[64:ff9b::808:808]/", True),
    ("http://[2002:808:808::1]/", True),
    ("https://example.com/hook", True),
    ("https://hooks.example.com:8443/x?y=1", True),
    ("http://localhost.example.com/", True),
]


def test_url_table_is_large_enough() -> None:
    assert len(URL_TABLE) >= 45
    assert len({url for url, _ in URL_TABLE}) == len(URL_TABLE)


@pytest.mark.parametrize(("url", "allowed"), URL_TABLE)
def test_check_url_default_policy(url: str, allowed: bool) -> None:
    if allowed:
        ssrf.check_url(url, DEFAULT)
    else:
        with pytest.raises(ssrf.BlockedAddressError):
            ssrf.check_url(url, DEFAULT)


@pytest.mark.parametrize(("url", "allowed"), URL_TABLE)
def test_check_request_host_agrees_with_check_url(url: str, allowed: bool) -> None:
    if allowed:
        ssrf.check_request_host(yarl.URL(url), DEFAULT)
    else:
        with pytest.raises(ssrf.BlockedAddressError):
            ssrf.check_request_host(url, DEFAULT)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("127.0.0.2..", "127.0.0.2"),
        ("0x7f.1...", "127.0.0.1"),
        ("0x", "0.0.0.0"),
        ("0", "0.0.0.0"),
        ("00", "0.0.0.0"),
        ("10.0x10.020.1", "10.16.16.1"),
        ("1.65535", "1.0.255.255"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("fe80::1%25eth0", "fe80::1%eth0"),
        ("[FE80::1%25eth0]", "fe80::1%eth0"),
        ("example.com", None),
        ("localhost", None),
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
        ("1.256.1.1", None),
        ("1.2.65536", None),
        ("4294967296", None),
        ("08.0.0.1", None),
        ("0x7g.1", None),
        ("1..1", None),
        ("", None),
        ("::zz", None),
        ("0x7f.1.example", None),
    ],
)
def test_parse_ip_literal(host: str, expected: str | None) -> None:
    parsed = ssrf.parse_ip_literal(host)
    assert (None if parsed is None else str(parsed)) == expected


def test_block_reason_names_the_range() -> None:
    assert DEFAULT.block_reason(ipaddress.ip_address("169.254.169.254")) == (
        "link-local / cloud metadata"
    )
    assert DEFAULT.block_reason(ipaddress.ip_address("2001::1")) == "Teredo tunnelling"
    reason = DEFAULT.block_reason(ipaddress.ip_address("64:ff9b::7f00:1"))
    assert reason is not None
    assert "NAT64" in reason
    assert "127.0.0.1" in reason
    assert DEFAULT.block_reason(ipaddress.ip_address("8.8.8.8")) is None
    assert DEFAULT.is_allowed(ipaddress.ip_address("2606:4700:4700::1111"))


def test_teredo_is_blocked_even_when_the_client_looks_global() -> None:
    # Teredo 2001:0:<server>:<flags>:<port>:<client xor> with a global server and client.
    teredo = ipaddress.IPv6Address("2001:0:808:808:0:0:f7f7:f7f7")
    assert teredo.teredo is not None
    assert not DEFAULT.is_allowed(teredo)


def test_allow_list_allows_exactly_the_listed_network() -> None:
    policy = ssrf.AddressPolicy.from_strings(["127.0.0.1/32"])
    ssrf.check_url("http://127.0.0.1:8080/hook", policy)
    ssrf.check_url("http://2130706433/", policy)
    ssrf.check_url("http://[::ffff:127.0.0.1]/", policy)  # same socket destination
    ssrf.check_url("http://localhost/", policy)
    with pytest.raises(ssrf.BlockedAddressError):
        ssrf.check_url("http://127.0.0.2/", policy)
    with pytest.raises(ssrf.BlockedAddressError):
        ssrf.check_url("http://[::1]/", policy)
    with pytest.raises(ssrf.BlockedAddressError):
        ssrf.check_url("http://169.254.169.254/", policy)
    # NAT64 and 6to4 route through a translator, not to the allow-listed host itself.
    with pytest.raises(ssrf.BlockedAddressError):
        ssrf.check_url("http://[64:ff9b::7f00:1]/", policy)


def test_allow_list_of_a_private_range_and_ipv6() -> None:
    policy = ssrf.AddressPolicy.from_strings([" 10.0.0.0/8 ", "fd00::/8"], https_only=False)
    assert policy.allow == (
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv6Network("fd00::/8"),
    )
    ssrf.check_url("http://10.20.30.40/", policy)
    ssrf.check_url("http://[fd12::1]/", policy)
    with pytest.raises(ssrf.BlockedAddressError):
        ssrf.check_url("http://192.168.0.1/", policy)


@pytest.mark.parametrize("cidr", ["not-a-cidr", "127.0.0.1/33", "127.0.0.1/8", "", "::1/129"])
def test_from_strings_rejects_bad_cidrs(cidr: str) -> None:
    with pytest.raises(ValueError, match="invalid allow-list CIDR"):
        ssrf.AddressPolicy.from_strings([cidr])


def test_https_only() -> None:
    policy = ssrf.AddressPolicy.from_strings([], https_only=True)
    ssrf.check_url("https://example.com/", policy)
    with pytest.raises(ssrf.InvalidUrlError, match="https"):
        ssrf.check_url("http://example.com/", policy)
    ssrf.check_url("http://example.com/", DEFAULT)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://example.com:70/_x",
        "ws://example.com/",
        "javascript:alert(1)",
        "example.com/hook",
        "",
    ],
)
def test_bad_schemes_are_invalid(url: str) -> None:
    with pytest.raises(ssrf.InvalidUrlError):
        ssrf.check_url(url, DEFAULT)


@pytest.mark.parametrize(
    "url",
    [
        "http:///hook",
        "https://",
        "http://:8080/",
        "http://user:secret@example.com/",
        "http://user@example.com/",
        "http://:secret@example.com/",
        "http://example.com:0/",
        "http://example.com:99999/",
        "http://example.com:abc/",
    ],
)
def test_missing_host_credentials_and_bad_ports_are_invalid(url: str) -> None:
    with pytest.raises(ssrf.InvalidUrlError):
        ssrf.check_url(url, DEFAULT)


def test_invalid_url_error_is_a_value_error() -> None:
    assert issubclass(ssrf.InvalidUrlError, ValueError)


def test_block_message_names_host_and_reason_but_not_path_or_query() -> None:
    with pytest.raises(ssrf.BlockedAddressError) as info:
        ssrf.check_request_host("http://0x7f.1:8080/secret-path?token=abc", DEFAULT)
    message = str(info.value)
    assert "0x7f.1" in message
    assert "127.0.0.1" in message
    assert "loopback" in message
    assert "secret" not in message
    assert "token" not in message
    assert info.value.host == "0x7f.1"
    assert info.value.address == "127.0.0.1"


def test_check_request_host_ignores_names() -> None:
    ssrf.check_request_host("http://internal.example/", DEFAULT)
    ssrf.check_request_host(yarl.URL("http://metadata.google.internal/"), DEFAULT)


class FakeResolver(aiohttp.abc.AbstractResolver):
    """Answers every lookup with fixed addresses and records what it was asked."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts
        self.calls: list[tuple[str, int, socket.AddressFamily]] = []
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        self.calls.append((host, port, family))
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
            for address in self.hosts
        ]

    async def close(self) -> None:
        self.closed = True


async def test_guarded_resolver_returns_only_allowed_addresses() -> None:
    inner = FakeResolver(
        [
            "127.0.0.1",
            "8.8.8.8",
            "::1",
            "169.254.169.254",
            "2606:4700:4700::1111",
            "fe80::1%eth0",
            "::ffff:10.0.0.1",
            "not-an-address",
        ]
    )
    resolver = ssrf.GuardedResolver(DEFAULT, inner)
    results = await resolver.resolve("rebind.example", 443, socket.AF_UNSPEC)
    assert [result["host"] for result in results] == ["8.8.8.8", "2606:4700:4700::1111"]
    assert all(result["port"] == 443 for result in results)
    assert inner.calls == [("rebind.example", 443, socket.AF_UNSPEC)]


async def test_guarded_resolver_raises_when_every_address_is_blocked() -> None:
    resolver = ssrf.GuardedResolver(DEFAULT, FakeResolver(["127.0.0.1", "10.0.0.1", "::1"]))
    with pytest.raises(ssrf.BlockedAddressError) as info:
        await resolver.resolve("evil.example", 80)
    assert info.value.host == "evil.example"
    assert info.value.address == "127.0.0.1"
    assert "loopback" in str(info.value)
    assert "all 3" in str(info.value)


async def test_guarded_resolver_raises_on_empty_answer() -> None:
    resolver = ssrf.GuardedResolver(DEFAULT, FakeResolver([]))
    with pytest.raises(ssrf.BlockedAddressError, match="no addresses"):
        await resolver.resolve("empty.example", 80)


async def test_guarded_resolver_blocks_literals_and_localhost_without_asking() -> None:
    inner = FakeResolver(["8.8.8.8"])  # would be allowed, so a pass-through would show
    resolver = ssrf.build_connector_resolver(DEFAULT, inner)
    for host in ["127.0.0.1", "0x7f.1", "::1", "localhost", "api.localhost."]:
        with pytest.raises(ssrf.BlockedAddressError):
            await resolver.resolve(host, 80)
    assert inner.calls == []


async def test_guarded_resolver_honours_the_allow_list() -> None:
    policy = ssrf.AddressPolicy.from_strings(["127.0.0.1/32"])
    resolver = ssrf.GuardedResolver(policy, FakeResolver(["127.0.0.1", "127.0.0.2", "::1"]))
    results = await resolver.resolve("localhost", 8080)
    assert [result["host"] for result in results] == ["127.0.0.1"]
    assert resolver.policy is policy


async def test_guarded_resolver_closes_its_inner_resolver() -> None:
    inner = FakeResolver([])
    await ssrf.GuardedResolver(DEFAULT, inner).close()
    assert inner.closed
    await ssrf.GuardedResolver(DEFAULT).close()  # nothing created yet, nothing to close


async def test_check_url_resolved() -> None:
    blocked = FakeResolver(["10.0.0.1"])
    with pytest.raises(ssrf.BlockedAddressError):
        await ssrf.check_url_resolved("https://internal.example/hook", DEFAULT, blocked)
    assert blocked.calls == [("internal.example", 443, socket.AF_UNSPEC)]

    await ssrf.check_url_resolved("https://ok.example/", DEFAULT, FakeResolver(["1.1.1.1"]))

    literal = FakeResolver(["10.0.0.1"])
    await ssrf.check_url_resolved("https://8.8.8.8/", DEFAULT, literal)
    assert literal.calls == []
    with pytest.raises(ssrf.InvalidUrlError):
        await ssrf.check_url_resolved("ftp://ok.example/", DEFAULT, literal)


def test_is_blocked_error_walks_causes() -> None:
    blocked = ssrf.BlockedAddressError("h", "127.0.0.1", "loopback")
    assert ssrf.is_blocked_error(blocked)

    wrapped = aiohttp.ClientOSError("wrapped")
    wrapped.__cause__ = blocked  # what `raise ... from blocked` records
    assert ssrf.is_blocked_error(wrapped)

    class WithOsError(Exception):
        os_error: BaseException = blocked

    assert ssrf.is_blocked_error(WithOsError())

    unrelated = aiohttp.ClientOSError("refused")
    cyclic = ValueError("x")
    unrelated.__context__ = cyclic
    cyclic.__context__ = unrelated
    assert not ssrf.is_blocked_error(unrelated)
    assert not ssrf.is_blocked_error(aiohttp.InvalidUrlClientError("2130706433"))


# One address inside every blocked range, with the reason the block must name: removing a
# row of the table (192.88.99.0/24, 3fff::/20, ...) must fail here.
EVERY_BLOCKED_RANGE = [
    ("0.1.2.3", "this network"),
    ("10.1.2.3", "RFC 1918"),
    ("100.100.1.1", "carrier-grade NAT"),
    ("127.8.8.8", "loopback"),
    ("169.254.1.1", "link-local"),
    ("172.20.1.1", "RFC 1918"),
    ("192.0.0.9", "IETF protocol"),
    ("192.0.2.77", "TEST-NET-1"),
    ("192.88.99.7", "6to4 relay"),
    ("192.168.7.7", "RFC 1918"),
    ("198.19.0.1", "benchmarking"),
    ("198.51.100.7", "TEST-NET-2"),
    ("203.0.113.7", "TEST-NET-3"),
    ("239.1.1.1", "multicast"),
    ("250.1.1.1", "reserved"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("64:ff9b:1::7", "local-use NAT64"),
    ("100::7", "discard-only"),
    ("2001:0:1::7", "Teredo"),
    ("2001:2::7", "benchmarking"),
    ("2001:1f::7", "ORCHID"),
    ("2001:db8::7", "documentation"),
    ("3fff:1::7", "documentation"),
    ("fd12::7", "unique local"),
    ("fe80::7", "link-local"),
    ("fec0::7", "site-local"),
    ("ff05::7", "multicast"),
]


@pytest.mark.parametrize(("address", "reason"), EVERY_BLOCKED_RANGE)
def test_one_address_of_every_blocked_range_is_blocked_for_its_reason(
    address: str, reason: str
) -> None:
    found = ssrf.AddressPolicy().block_reason(ipaddress.ip_address(address))
    assert found is not None, address
    assert reason in found, (address, found)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("1.2.3.4.0", None),  # five parts is never an address
        ("[::1", None),  # unbalanced brackets
        ("::1]", None),
        ("[::1%25]", "::1"),  # an empty zone id
    ],
)
def test_parse_ip_literal_edges(host: str, expected: str | None) -> None:
    ip = ssrf.parse_ip_literal(host)
    assert (None if ip is None else str(ip)) == expected


def test_embedded_ipv4_is_judged_by_that_address() -> None:
    allowed = ssrf.AddressPolicy()
    # IPv4-compatible forms of a global address pass, as the address itself would.
    assert allowed.block_reason(ipaddress.ip_address("::808:808")) is None
    private = allowed.block_reason(ipaddress.ip_address("::a00:1"))
    assert private is not None
    assert "10.0.0.1" in private
    assert "RFC 1918" in private
    smallest = allowed.block_reason(ipaddress.ip_address("::2"))
    assert smallest is not None
    assert "0.0.0.2" in smallest


def test_zone_ids_do_not_change_the_verdict() -> None:
    policy = ssrf.AddressPolicy()
    global_scoped = ssrf.parse_ip_literal("[2606:4700::1%25eth0]")
    assert global_scoped is not None
    assert policy.block_reason(global_scoped) is None
    link_local = ssrf.parse_ip_literal("[fe80::1%25eth0]")
    assert link_local is not None
    assert policy.block_reason(link_local) is not None


def test_ports_at_the_edges() -> None:
    ssrf.check_url("http://example.com:1/", DEFAULT)
    ssrf.check_url("http://example.com:65535/", DEFAULT)
    for port in ("0", "65536"):
        with pytest.raises(ssrf.InvalidUrlError):
            ssrf.check_url(f"http://example.com:{port}/", DEFAULT)


def test_names_that_only_resemble_localhost_are_names() -> None:
    ssrf.check_url("http://localhostX/", DEFAULT)
    ssrf.check_request_host("http://localhostX/", DEFAULT)


def test_https_only_blocks_clear_text_at_the_attempt() -> None:
    policy = ssrf.AddressPolicy(https_only=True)
    ssrf.check_request_host("https://example.com/", policy)
    ssrf.check_request_host(yarl.URL("https://example.com/"), policy)
    with pytest.raises(ssrf.BlockedAddressError, match="only https"):
        ssrf.check_request_host("http://example.com/", policy)


def test_blocked_address_error_fields_and_text() -> None:
    with pytest.raises(ssrf.BlockedAddressError) as info:
        ssrf.check_url("http://10.1.2.3/x", DEFAULT)
    assert (info.value.host, info.value.address) == ("10.1.2.3", "10.1.2.3")
    assert "RFC 1918" in info.value.reason
    assert "(10.1.2.3)" not in str(info.value)  # the address is not repeated after the host
    with pytest.raises(ssrf.BlockedAddressError) as named:
        ssrf.check_url("http://0x0a.1.2.3/x", DEFAULT)
    assert named.value.host == "0x0a.1.2.3"
    assert "0x0a.1.2.3 (10.1.2.3)" in str(named.value)
    for url in ("http://localhost/", "http://a..b/"):
        with pytest.raises(ssrf.BlockedAddressError) as by_name:
            ssrf.check_url(url, DEFAULT)
        assert by_name.value.host == yarl.URL(url).raw_host
        assert by_name.value.address is None


async def test_the_connector_resolver_wraps_the_given_resolver() -> None:
    inner = FakeResolver(["8.8.8.8"])
    resolver = ssrf.build_connector_resolver(DEFAULT, inner)
    results = await resolver.resolve("hooks.example", 443)
    assert [r["host"] for r in results] == ["8.8.8.8"]
    assert inner.calls


async def test_a_name_with_no_addresses_is_blocked_with_its_host() -> None:
    resolver = ssrf.GuardedResolver(DEFAULT, FakeResolver([]))
    with pytest.raises(ssrf.BlockedAddressError) as info:
        await resolver.resolve("empty.example", 80)
    assert info.value.host == "empty.example"


def test_is_blocked_error_survives_repeated_links() -> None:
    class Wrapper(Exception):
        os_error: BaseException | None = None

    repeated = ValueError("seen twice")
    outer = Wrapper("outer")
    outer.__cause__ = ssrf.BlockedAddressError("h", None, "r")
    outer.__context__ = repeated
    outer.os_error = repeated
    assert ssrf.is_blocked_error(outer)
