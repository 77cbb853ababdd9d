"""SSRF guard: decide which network addresses a webhook may reach.

Subscribers choose webhook URLs, so a URL is untrusted input that could point the dispatcher
at loopback, the cloud metadata service (169.254.169.254) or a private network. This module
is the single policy: by default only globally routable addresses pass, and operators may
allow-list CIDRs (the tests and the demo allow ``127.0.0.1/32``). It is enforced three times:

* ``check_url`` when a subscription is created: scheme, host, credentials, port, and hosts
  that are IP literals in any spelling a C resolver accepts (``2130706433``, ``0x7f.1``).
* ``GuardedResolver`` on the connector: aiohttp connects only to the addresses a resolver
  returns, so filtering them here also covers DNS rebinding (the name is judged by the very
  addresses the socket will use, not by an earlier lookup).
* ``check_request_host`` before every attempt, because aiohttp never calls the resolver
  for hosts that look like IP literals.

IPv6 forms that embed an IPv4 address are judged by that IPv4 address: IPv4-mapped
(``::ffff:0:0/96``), IPv4-compatible (``::/96``), NAT64 (``64:ff9b::/96``) and 6to4
(``2002::/16``). So ``[::ffff:7f00:1]`` is blocked as loopback while a 6to4 or NAT64 address
wrapping a global IPv4 passes, as the IPv4 address itself would. Teredo (``2001::/32``)
obfuscates its client address and local-use NAT64 (``64:ff9b:1::/48``) is not globally
routable, so both are blocked outright.

How a block reaches the caller of ``session.post``: aiohttp (3.14) wraps only ``OSError``
from a resolver in ``ClientConnectorDNSError``; ``BlockedAddressError`` is not one, so it
propagates unchanged. ``is_blocked_error`` also follows ``__cause__`` and ``os_error`` in case
a caller or a later aiohttp wraps it. Note aiohttp 3.14 itself rejects non-canonical numeric
hosts (``2130706433``) with ``InvalidUrlClientError``; ``check_request_host`` runs first and
reports them as blocks. The session must not follow redirects (``allow_redirects=False``),
since a redirect to a literal address would skip both the resolver and the per-attempt
check, and must not use a proxy (``trust_env=False``), since the resolver then judges only
the proxy.

This module must not do I/O of its own beyond the resolver it is handed, read configuration
or the environment, or log: callers decide how a block is reported and classified.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable

import aiohttp.abc
import aiohttp.resolver
import yarl

__all__ = [
    "AddressPolicy",
    "BlockedAddressError",
    "GuardedResolver",
    "IPAddress",
    "IPNetwork",
    "InvalidUrlError",
    "build_connector_resolver",
    "check_request_host",
    "check_url",
    "check_url_resolved",
    "is_blocked_error",
    "parse_ip_literal",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = frozenset({"http", "https"})

# Every range listed with its reason so a block message says why. The final `is_global`
# fallback in `block_reason` catches anything the stdlib knows about that is missing here;
# the table exists because `is_global` alone lets multicast and some reserved ranges pass
# on Python 3.11.
_IPV4_BLOCKED: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(cidr), reason)
    for cidr, reason in (
        ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT (100.64.0.0/10)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local / cloud metadata"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved / broadcast"),
    )
)

_IPV6_BLOCKED: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(cidr), reason)
    for cidr, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo tunnelling"),
        ("2001:2::/48", "benchmarking"),
        ("2001:10::/28", "ORCHID"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique local (ULA)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)

# Only 2000::/3 is allocated as global unicast; anything else is reserved space.
_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")

# What `localhost` is taken to mean when judging it without a lookup (RFC 6761 reserves the
# name and its subdomains for loopback).
_LOCALHOST_ADDRESSES: tuple[IPAddress, ...] = (
    ipaddress.IPv4Address("127.0.0.1"),
    ipaddress.IPv6Address("::1"),
)


class BlockedAddressError(Exception):
    """The destination is an address the policy does not allow.

    Permanent for the URL as configured: retrying reaches the same address. The message names
    the host and the reason, never a path, query or credentials.
    """

    def __init__(self, host: str, address: str | None, reason: str) -> None:
        self.host = host
        self.address = address
        self.reason = reason
        where = host if address is None or address == host else f"{host} ({address})"
        super().__init__(f"destination {where} is blocked: {reason}")


class InvalidUrlError(ValueError):
    """The URL is unusable as a webhook target (scheme, host, credentials or port)."""


@dataclasses.dataclass(frozen=True)
class AddressPolicy:
    """Which addresses may be reached: global ones, plus the allow-listed networks."""

    allow: tuple[IPNetwork, ...] = ()
    https_only: bool = False

    @classmethod
    def from_strings(cls, cidrs: Iterable[str], https_only: bool = False) -> AddressPolicy:
        """Build from configuration strings; raise ValueError naming the first bad CIDR."""
        networks: list[IPNetwork] = []
        for cidr in cidrs:
            text = cidr.strip()
            try:
                # strict: `127.0.0.1/8` is almost certainly a typo for a narrower allow.
                networks.append(ipaddress.ip_network(text, strict=True))
            except ValueError as exc:
                raise ValueError(f"invalid allow-list CIDR {text!r}: {exc}") from exc
        return cls(allow=tuple(networks), https_only=https_only)

    def is_allowed(self, ip: IPAddress) -> bool:
        return self.block_reason(ip) is None

    def block_reason(self, ip: IPAddress) -> str | None:
        """Why `ip` is blocked, or None when it may be reached."""
        ip = _without_scope(ip)
        if self._allow_listed(ip):
            return None
        if isinstance(ip, ipaddress.IPv4Address):
            return _ipv4_reason(ip)
        return _ipv6_reason(ip)

    def _allow_listed(self, ip: IPAddress) -> bool:
        candidates: list[IPAddress] = [ip]
        # An IPv4-mapped address is the same socket destination as its IPv4 address, so an
        # allow for 127.0.0.1 also covers ::ffff:127.0.0.1. Other embeddings route elsewhere.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(
            candidate.version == network.version and candidate in network
            for candidate in candidates
            for network in self.allow
        )


def _without_scope(ip: IPAddress) -> IPAddress:
    # The zone id picks an interface; it never makes a link-local address global.
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return ipaddress.IPv6Address(int(ip))
    return ip


def _ipv4_reason(ip: ipaddress.IPv4Address) -> str | None:
    for network, reason in _IPV4_BLOCKED:
        if ip in network:
            return reason
    if not ip.is_global:
        return "not globally routable"
    return None


def _ipv6_reason(ip: ipaddress.IPv6Address) -> str | None:
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        kind, ipv4 = embedded
        inner = _ipv4_reason(ipv4)
        return None if inner is None else f"{kind} embedding {ipv4}: {inner}"
    for network, reason in _IPV6_BLOCKED:
        if ip in network:
            return reason
    if ip not in _IPV6_GLOBAL_UNICAST:
        return "reserved IPv6 space"
    if not ip.is_global:
        return "not globally routable"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped IPv6", ip.ipv4_mapped
    # :: and ::1 sit inside ::/96 but are IPv6's own unspecified and loopback addresses.
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return "IPv4-compatible IPv6", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """Return the address `host` denotes if it is an IP literal, else None.

    Accepts what a C resolver would turn into an address without DNS, because that is what
    getaddrinfo does with such a host: inet_aton forms (``2130706433``, ``0x7f000001``,
    ``0177.0.0.1``, ``127.1``, ``0x7f.1``), bracketed IPv6, zone ids, percent-encoding and
    trailing dots (any number: ``127.0.0.2..`` is judged as 127.0.0.2, not left to the HTTP
    library). Erring towards "this is an address" is safe: the address is then judged.
    """
    text = urllib.parse.unquote(host).strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        address, _, zone = text.partition("%")
        try:
            ipv6 = ipaddress.IPv6Address(address)
        except ValueError:
            return None
        # The zone is kept for the record; `block_reason` ignores it.
        if zone:
            try:
                return ipaddress.IPv6Address(f"{address}%{zone}")
            except ValueError:
                return ipv6
        return ipv6
    return _parse_inet_aton(text.rstrip("."))


def _parse_inet_aton(text: str) -> ipaddress.IPv4Address | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        value = _parse_inet_aton_part(part)
        if value is None:
            return None
        values.append(value)
    # The last part fills every remaining byte: a, a.b (8.24), a.b.c (8.8.16), a.b.c.d.
    *leading, last = values
    if any(value > 0xFF for value in leading):
        return None
    last_bits = 8 * (4 - len(leading))
    if last >= 1 << last_bits:
        return None
    number = last
    for index, value in enumerate(leading):
        number |= value << (24 - 8 * index)
    return ipaddress.IPv4Address(number)


def _parse_inet_aton_part(part: str) -> int | None:
    if part.startswith("0x"):
        digits, base = part[2:], 16
        # glibc's inet_aton reads a bare "0x" as zero.
        if digits == "":
            return 0
    elif part.startswith("0") and len(part) > 1:
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    allowed = "0123456789abcdef"[:base]
    if digits == "" or any(char not in allowed for char in digits):
        return None
    return int(digits, base)


def _is_localhost_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def _check_host(host: str, policy: AddressPolicy) -> None:
    """Raise if `host` is a literal or a localhost name the policy blocks; other names pass."""
    ip = parse_ip_literal(host)
    if ip is not None:
        reason = policy.block_reason(ip)
        if reason is not None:
            raise BlockedAddressError(host, str(ip), reason)
    elif ".." in host or host.startswith("."):
        # An empty label is no DNS name; what a resolver or the HTTP library would make of it
        # is not this guard's to guess.
        raise BlockedAddressError(host, None, "malformed host name (empty label)")
    elif _is_localhost_name(host) and not any(
        # Blocked unless the allow-list covers what the name means.
        policy.is_allowed(address)
        for address in _LOCALHOST_ADDRESSES
    ):
        raise BlockedAddressError(host, None, "localhost is loopback")


def _validate_url(url: str, policy: AddressPolicy) -> tuple[str, int]:
    """Everything `check_url` checks; returns the raw host and the port."""
    try:
        # yarl is what aiohttp uses, so the host judged here is the host it will connect to.
        parsed = yarl.URL(url)
    except (ValueError, TypeError) as exc:
        raise InvalidUrlError(f"unparseable URL: {exc}") from exc
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise InvalidUrlError(f"scheme {parsed.scheme!r} is not allowed; use http or https")
    if not parsed.raw_host:
        raise InvalidUrlError("URL has no host")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        # Credentials in URLs leak into logs and Referer-like places; use the auth headers.
        raise InvalidUrlError("URL must not contain credentials (user:password@)")
    try:
        port = parsed.port
    except ValueError as exc:
        raise InvalidUrlError(f"invalid port: {exc}") from exc
    if port is None or not 0 < port < 65536:
        raise InvalidUrlError(f"invalid port {port!r}")
    if policy.https_only and parsed.scheme != "https":
        raise InvalidUrlError("only https URLs are allowed")
    _check_host(parsed.raw_host, policy)
    return parsed.raw_host, port


def check_url(url: str, policy: AddressPolicy) -> None:
    """Validate a webhook URL when it is configured; names are not resolved here.

    Raises InvalidUrlError for a malformed URL and BlockedAddressError for a literal (or
    localhost) destination the policy blocks.
    """
    _validate_url(url, policy)


async def check_url_resolved(
    url: str, policy: AddressPolicy, resolver: aiohttp.abc.AbstractResolver
) -> None:
    """`check_url`, then resolve a hostname and fail if no address it has is allowed.

    Useful for early feedback at creation time only: the answer can change, which is why
    `GuardedResolver` judges again at every connection.
    """
    host, port = _validate_url(url, policy)
    if parse_ip_literal(host) is not None:
        return
    await GuardedResolver(policy, resolver).resolve(host, port, socket.AF_UNSPEC)


# Resolving a new URL's host is early feedback, not the defence (the connector judges every
# connection): a lookup that hangs or fails lets the URL through rather than blocking a create.
RESOLVE_TIMEOUT_SECONDS = 5.0


def resolving_check(
    policy: AddressPolicy, resolver: aiohttp.abc.AbstractResolver | None = None
) -> Callable[[str], Awaitable[str | None]]:
    """The management layer's URL check: why a URL's host is refused (every address it has is
    blocked), or None. ``resolver`` is for tests; the system one otherwise."""

    async def check(url: str) -> str | None:
        inner = resolver or aiohttp.resolver.DefaultResolver()
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
                await check_url_resolved(url, policy, inner)
        except BlockedAddressError as exc:
            return str(exc)
        except (OSError, TimeoutError):
            pass  # not resolvable now; every connection is judged again when it is made
        finally:
            if resolver is None:
                await inner.close()
        return None

    return check


def check_request_host(url: yarl.URL | str, policy: AddressPolicy) -> None:
    """Block a literal destination before a request; call it at every attempt.

    aiohttp connects straight to hosts that look like IP literals without asking the
    resolver, so `GuardedResolver` never sees them. Hostnames are left to the resolver
    (except localhost, which is decided here without a lookup).
    """
    parsed = url if isinstance(url, yarl.URL) else yarl.URL(url)
    if policy.https_only and parsed.scheme != "https":
        # A row written before the setting (or behind the validation's back) must not go out
        # in clear text either.
        raise BlockedAddressError(parsed.raw_host or "", None, "only https URLs are allowed")
    if parsed.raw_host:
        _check_host(parsed.raw_host, policy)


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """A resolver that returns only addresses the policy allows.

    Pass it to ``aiohttp.TCPConnector(resolver=...)``. The connector does not close a
    resolver it was given, so the owner calls ``close()`` after closing the session.
    """

    def __init__(
        self, policy: AddressPolicy, inner: aiohttp.abc.AbstractResolver | None = None
    ) -> None:
        self._policy = policy
        # Created lazily: the default resolvers bind to the running loop when constructed.
        self._inner = inner

    @property
    def policy(self) -> AddressPolicy:
        return self._policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        # Fail fast on a blocked literal or localhost; allowed ones are still resolved, since
        # the inner resolver turns them into socket addresses that the filter re-judges.
        _check_host(host, self._policy)
        if self._inner is None:
            self._inner = aiohttp.resolver.DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        allowed: list[aiohttp.abc.ResolveResult] = []
        first_block: tuple[str, str] | None = None
        for result in results:
            ip = parse_ip_literal(result["host"])
            # An answer that is not an address cannot be judged, so it is not used.
            reason = "unparseable address" if ip is None else self._policy.block_reason(ip)
            if reason is None:
                allowed.append(result)
            elif first_block is None:
                first_block = (result["host"], reason)
        if allowed:
            return allowed
        if first_block is None:
            raise BlockedAddressError(host, None, "resolved to no addresses")
        address, reason = first_block
        if len(results) > 1:
            reason = f"{reason} (and all {len(results)} resolved addresses blocked)"
        raise BlockedAddressError(host, address, reason)

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def build_connector_resolver(
    policy: AddressPolicy, inner: aiohttp.abc.AbstractResolver | None = None
) -> GuardedResolver:
    """The resolver to hand to ``aiohttp.TCPConnector(resolver=...)``."""
    return GuardedResolver(policy, inner)


def is_blocked_error(exc: BaseException) -> bool:
    """True if `exc` is, or was caused by, a BlockedAddressError.

    Follows ``__cause__``, ``__context__`` and aiohttp's ``os_error`` so a block is found
    whether aiohttp raised it as-is or wrapped it in ClientConnectorError.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BlockedAddressError):
            return True
        for linked in (
            current.__cause__,
            current.__context__,
            getattr(current, "os_error", None),
        ):
            if isinstance(linked, BaseException):
                pending.append(linked)
    return False
