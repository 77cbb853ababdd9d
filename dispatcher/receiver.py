"""Receiver toolkit: verify and de-duplicate webhooks that dispatcher sends.

For people on the receiving end. It checks the Standard Webhooks
headers (with secret rotation on either side), the optional body-only ``sha256=<hex>``
header, remembers ``webhook-id`` values so at-least-once delivery is processed once, and
wraps all of it in an aiohttp handler, which continues the request's W3C ``traceparent`` in a
server span when OpenTelemetry is installed (so ``process`` runs inside the sender's trace). It
must not log or echo secrets, signatures or bodies, and it never reaches into dispatcher's own
tables or configuration.

Exception hierarchy::

    VerificationError
    ├── MissingHeaderError      a required header is absent or empty
    ├── InvalidSignatureError   no signature matches (tampered body, wrong secret, malformed)
    └── TimestampError          webhook-timestamp too old, too new or not an integer
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiohttp import web

from dispatcher import signing, tracing

if TYPE_CHECKING:
    import asyncpg
    from aiohttp import typedefs

__all__ = [
    "Claim",
    "IdempotencyStore",
    "InvalidSignatureError",
    "MemoryIdempotencyStore",
    "MissingHeaderError",
    "PostgresIdempotencyStore",
    "TimestampError",
    "VerificationError",
    "Verified",
    "Verifier",
    "verify_body_hmac",
    "verify_standard",
    "webhook_handler",
]

_log = logging.getLogger(__name__)

DEFAULT_TOLERANCE_SECONDS: Final = 300
# Matches the dispatcher's default retry horizon (RetryPolicy.max_age_seconds): a retry can
# arrive up to that long after the first attempt, so remember ids at least that long.
DEFAULT_TTL_SECONDS: Final = 3 * 86400.0
BODY_HMAC_PREFIX: Final = "sha256="

HEADER_ID: Final = "webhook-id"
HEADER_TIMESTAMP: Final = "webhook-timestamp"
HEADER_SIGNATURE: Final = "webhook-signature"

# Unix seconds as the sender writes them: ASCII digits without leading zeros, short enough
# that int() stays cheap on hostile input. The signature covers these exact bytes.
_TIMESTAMP_RE: Final = re.compile(r"0|[1-9][0-9]{0,11}")
# The body HMAC as the sender writes it: lower-case hex of SHA-256, nothing around it.
_BODY_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")
# How long a receiver process may hold a webhook-id "in progress" in the Postgres store before
# another process may take it over (the first one is presumed dead).
DEFAULT_PROCESSING_SECONDS: Final = 300.0
_TABLE_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?")


class VerificationError(Exception):
    """The request cannot be shown to come from the holder of the secret."""

    code = "verification_failed"


class MissingHeaderError(VerificationError):
    code = "missing_header"


class InvalidSignatureError(VerificationError):
    code = "invalid_signature"


class TimestampError(VerificationError):
    code = "timestamp"


def _secret_list(secrets: str | Sequence[str]) -> tuple[str, ...]:
    # A str is itself a Sequence[str]; treat it as one secret, not as its characters.
    items = (secrets,) if isinstance(secrets, str) else tuple(secrets)
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ValueError("at least one non-empty secret is required")
    return items


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that works for plain dicts as well as aiohttp's CIMultiDict."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        for key, candidate in headers.items():
            if key.lower() == lowered:
                return candidate
    return value


def _required(headers: Mapping[str, str], name: str) -> str:
    value = _header(headers, name)
    if not value:
        raise MissingHeaderError(f"missing {name} header")
    return value


def _check_timestamp(raw: str, tolerance_seconds: float, now: float) -> int:
    if not _TIMESTAMP_RE.fullmatch(raw):
        raise TimestampError("webhook-timestamp is not unix seconds")
    timestamp = int(raw)
    if timestamp < now - tolerance_seconds:
        raise TimestampError("webhook-timestamp is too old")
    if timestamp > now + tolerance_seconds:
        raise TimestampError("webhook-timestamp is too new")
    return timestamp


def _standard_signatures(header_value: str) -> list[bytes]:
    """Decoded ``v1`` signatures; other versions and undecodable entries are skipped."""
    found = []
    for entry in header_value.split():
        version, sep, encoded = entry.partition(",")
        if version != "v1" or not sep:
            continue
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def _verify_standard_keys(
    keys: Sequence[bytes],
    headers: Mapping[str, str],
    body: bytes,
    tolerance_seconds: float,
    now: float,
) -> tuple[str, int]:
    msg_id = _required(headers, HEADER_ID)
    raw_timestamp = _required(headers, HEADER_TIMESTAMP)
    signature_header = _required(headers, HEADER_SIGNATURE)
    timestamp = _check_timestamp(raw_timestamp, tolerance_seconds, now)
    offered = _standard_signatures(signature_header)
    if not offered:
        raise InvalidSignatureError("webhook-signature holds no v1 signature")
    # Exactly the bytes the sender signed: the header as received, not a re-rendered number.
    prefix = f"{msg_id}.{raw_timestamp}.".encode()
    for key in keys:
        mac = hmac.new(key, prefix, hashlib.sha256)
        mac.update(body)
        expected = mac.digest()
        # Compare against every entry (no early exit) so timing says nothing about which.
        matches = [hmac.compare_digest(expected, candidate) for candidate in offered]
        if any(matches):
            return msg_id, timestamp
    raise InvalidSignatureError("no webhook-signature entry matches")


def verify_standard(
    secrets: str | Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Verify the Standard Webhooks headers of one request; raise a ``VerificationError``.

    Passes when any of ``secrets`` (``whsec_<base64>``) produced any ``v1,`` entry, so both
    the sender's and the receiver's side of a rotation keep working."""
    keys = [signing.secret_key_bytes(s) for s in _secret_list(secrets)]
    _verify_standard_keys(
        keys, headers, body, tolerance_seconds, time.time() if now is None else now
    )


def _verify_body_hmac_keys(keys: Sequence[bytes], header_value: str | None, body: bytes) -> None:
    if not header_value:
        raise MissingHeaderError("missing body signature header")
    if not header_value.startswith(BODY_HMAC_PREFIX):
        raise InvalidSignatureError("body signature must start with sha256=")
    digits = header_value[len(BODY_HMAC_PREFIX) :]
    if not _BODY_HEX_RE.fullmatch(digits):
        # bytes.fromhex would also take upper case and spaces: not what was signed.
        raise InvalidSignatureError("body signature is not 64 lower-case hex digits")
    offered = bytes.fromhex(digits)
    matches = [
        hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), offered) for key in keys
    ]
    if not any(matches):
        raise InvalidSignatureError("body signature does not match")


def verify_body_hmac(secret: str | Sequence[str], header_value: str | None, body: bytes) -> None:
    """Verify a ``sha256=<hex HMAC-SHA256(body)>`` header keyed with ``secret.encode()``.

    Several secrets may be given (a receiver mid-rotation); any match passes."""
    _verify_body_hmac_keys([s.encode() for s in _secret_list(secret)], header_value, body)


@dataclasses.dataclass(frozen=True, slots=True)
class Verified:
    """What a successful ``Verifier.verify`` established about a request."""

    webhook_id: str
    timestamp: int
    body_hmac: bool


class Verifier:
    """Verification settings for one endpoint: secret(s), optional body-HMAC header, clock.

    Keys are derived once; a malformed ``whsec_`` secret fails here, not per request. The
    sender's rule applies: ``whsec_`` secrets check the Standard Webhooks signature, and
    every secret checks the body-HMAC header when one is named. A plain secret therefore
    needs ``signature_header`` (it signs nothing else); ``webhook-id`` and a fresh
    ``webhook-timestamp`` are required either way."""

    __slots__ = ("_body_keys", "_clock", "_standard_keys", "signature_header", "tolerance_seconds")

    def __init__(
        self,
        secrets: str | Sequence[str],
        *,
        signature_header: str | None = None,
        tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        items = _secret_list(secrets)
        self._standard_keys = tuple(
            signing.secret_key_bytes(s) for s in items if signing.is_standard_secret(s)
        )
        self._body_keys = tuple(s.encode() for s in items)
        self.signature_header = signature_header or None
        if self.signature_header is None:
            for s in items:
                signing.check_secret_scheme(s, None)
        self.tolerance_seconds = tolerance_seconds
        self._clock = clock

    def __repr__(self) -> str:
        return (
            f"Verifier(secrets=*** x{len(self._body_keys)}, "
            f"signature_header={self.signature_header!r})"
        )

    def verify(self, headers: Mapping[str, str], body: bytes) -> Verified:
        """Check Standard Webhooks and, when configured, the body-HMAC header too."""
        if self._standard_keys:
            msg_id, timestamp = _verify_standard_keys(
                self._standard_keys, headers, body, self.tolerance_seconds, self._clock()
            )
        else:  # plain secrets only: the body HMAC below is the signature
            msg_id = _required(headers, HEADER_ID)
            raw = _required(headers, HEADER_TIMESTAMP)
            timestamp = _check_timestamp(raw, self.tolerance_seconds, self._clock())
        if self.signature_header is not None:
            value = _header(headers, self.signature_header)
            _verify_body_hmac_keys(self._body_keys, value, body)
        return Verified(msg_id, timestamp, body_hmac=self.signature_header is not None)


class Claim(enum.Enum):
    """What ``begin`` found for a webhook id."""

    NEW = "new"  # not seen (or its holder's lease ran out): process it now
    IN_PROGRESS = "in_progress"  # another request, here or in another process, has it
    DONE = "done"  # processed before: a duplicate


class IdempotencyStore(Protocol):
    """Remembers which webhook ids were already accepted.

    A store may also offer ``begin(webhook_id) -> Claim`` and ``finish(webhook_id)``; then
    ``webhook_handler`` lets the store decide what is in progress (across processes, for a
    shared store) instead of keeping that per process."""

    async def seen_or_remember(self, webhook_id: str) -> bool:
        """True when ``webhook_id`` was seen before; otherwise remember it and return False."""
        ...

    async def forget(self, webhook_id: str) -> None:
        """Drop ``webhook_id`` so its next delivery is processed (processing failed)."""
        ...


class MemoryIdempotencyStore:
    """In-process store, bounded by ``max_entries`` (LRU) and ``ttl_seconds``.

    One ordered dict in expiry order: a hit refreshes the entry and moves it to the end, so
    expired entries are always at the front and every operation is amortised O(1). Lost on
    restart; use ``PostgresIdempotencyStore`` where that matters."""

    def __init__(
        self,
        max_entries: int = 100_000,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl_seconds <= 0:
            raise ValueError("max_entries must be >= 1 and ttl_seconds > 0")
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._expires: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._running: set[str] = set()

    def __len__(self) -> int:
        return len(self._expires)

    def __contains__(self, webhook_id: object) -> bool:
        return webhook_id in self._expires

    def _evict_expired(self, now: float) -> None:
        while self._expires:
            oldest, expires_at = next(iter(self._expires.items()))
            if expires_at > now:
                return
            del self._expires[oldest]

    async def begin(self, webhook_id: str) -> Claim:
        if webhook_id in self._running:
            return Claim.IN_PROGRESS
        if await self.seen_or_remember(webhook_id):
            return Claim.DONE
        self._running.add(webhook_id)
        return Claim.NEW

    async def finish(self, webhook_id: str) -> None:
        self._running.discard(webhook_id)

    async def seen_or_remember(self, webhook_id: str) -> bool:
        now = self._clock()
        self._evict_expired(now)
        seen = webhook_id in self._expires
        self._expires[webhook_id] = now + self.ttl_seconds
        self._expires.move_to_end(webhook_id)
        if len(self._expires) > self.max_entries:
            self._expires.popitem(last=False)
        return seen

    async def forget(self, webhook_id: str) -> None:
        self._expires.pop(webhook_id, None)
        self._running.discard(webhook_id)


class PostgresIdempotencyStore:
    """Durable store in one table, so a restarted (or second) receiver still de-duplicates.

    The database decides what is in progress: ``begin`` inserts the id with a lease
    (``processing_until``), ``finish`` marks it done, ``forget`` drops it. A duplicate that
    arrives at any process while the lease runs is told "in progress"; a lease that ran out
    (its process died) is taken over. ``pool`` is an ``asyncpg.Pool``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        table: str = "webhook_receipts",
        *,
        processing_seconds: float = DEFAULT_PROCESSING_SECONDS,
    ) -> None:
        if not _TABLE_RE.fullmatch(table):
            raise ValueError("table must be a plain identifier, optionally schema-qualified")
        if processing_seconds <= 0:
            raise ValueError("processing_seconds must be > 0")
        self._pool = pool
        self.table = table
        self.processing_seconds = processing_seconds

    async def ensure_table(self) -> None:
        # completed_at defaults to now() so rows written by an older version (which only
        # remembered finished ids) read as done; begin() inserts NULL explicitly.
        await self._pool.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            " webhook_id text PRIMARY KEY,"
            " received_at timestamptz NOT NULL DEFAULT now())"
        )
        await self._pool.execute(
            f"ALTER TABLE {self.table}"
            " ADD COLUMN IF NOT EXISTS processing_until timestamptz,"
            " ADD COLUMN IF NOT EXISTS completed_at timestamptz DEFAULT now()"
        )

    async def begin(self, webhook_id: str) -> Claim:
        # One statement: the primary key and the row lock of ON CONFLICT DO UPDATE make
        # exactly one of any number of concurrent requests (in any process) get NEW. The
        # update only takes over an unfinished id whose lease ran out.
        row = await self._pool.fetchrow(
            f"INSERT INTO {self.table} AS r (webhook_id, processing_until, completed_at)"
            " VALUES ($1, now() + make_interval(secs => $2), NULL)"
            " ON CONFLICT (webhook_id) DO UPDATE"
            " SET processing_until = EXCLUDED.processing_until, received_at = now()"
            " WHERE r.completed_at IS NULL AND r.processing_until < now()"
            " RETURNING true AS claimed",
            webhook_id,
            float(self.processing_seconds),
        )
        if row is not None:
            return Claim.NEW
        # Plain read of the row the insert conflicted with.
        done = await self._pool.fetchval(
            f"SELECT completed_at IS NOT NULL FROM {self.table} WHERE webhook_id = $1",
            webhook_id,
        )
        # Gone meanwhile (forgotten after a failure): in progress is the retryable answer.
        return Claim.DONE if done else Claim.IN_PROGRESS

    async def finish(self, webhook_id: str) -> None:
        await self._pool.execute(
            f"UPDATE {self.table} SET completed_at = now() WHERE webhook_id = $1", webhook_id
        )

    async def seen_or_remember(self, webhook_id: str) -> bool:
        # The primary key arbitrates concurrent deliveries: exactly one insert returns a row.
        inserted = await self._pool.fetchval(
            f"INSERT INTO {self.table} (webhook_id) VALUES ($1)"
            " ON CONFLICT (webhook_id) DO NOTHING RETURNING true",
            webhook_id,
        )
        return inserted is None

    async def forget(self, webhook_id: str) -> None:
        await self._pool.execute(f"DELETE FROM {self.table} WHERE webhook_id = $1", webhook_id)

    async def prune(self, older_than_seconds: float) -> int:
        """Delete receipts older than the sender's retry horizon; returns how many went."""
        status = await self._pool.execute(
            f"DELETE FROM {self.table} WHERE received_at < now() - make_interval(secs => $1)",
            float(older_than_seconds),
        )
        return int(str(status).rsplit(" ", 1)[-1])


def _error(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status)


def webhook_handler(
    verifier: Verifier,
    store: IdempotencyStore,
    process: Callable[[dict[str, Any], Mapping[str, str]], Awaitable[None]],
) -> typedefs.Handler:
    """An aiohttp handler: verify → parse → de-duplicate → ``process`` → acknowledge.

    401 on a failed verification, 400 on a body that is not a JSON object, 200 ``duplicate``
    for an id already processed, 503 with ``Retry-After: 1`` while the same id is still being
    processed here (a retryable answer: the sender tries again shortly instead of taking the
    duplicate as delivered, and it does not count toward a 4xx limit), 500 when ``process``
    raises — the id is forgotten then, so the sender's retry is processed."""
    in_progress: set[str] = set()
    begin: Callable[[str], Awaitable[Claim]] | None = getattr(store, "begin", None)
    finish: Callable[[str], Awaitable[None]] | None = getattr(store, "finish", None)

    async def claim(webhook_id: str) -> Claim:
        if begin is not None:
            return await begin(webhook_id)
        # A store with only seen_or_remember: "in progress" is known to this process only.
        if await store.seen_or_remember(webhook_id):
            return Claim.IN_PROGRESS if webhook_id in in_progress else Claim.DONE
        in_progress.add(webhook_id)
        return Claim.NEW

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            verified = verifier.verify(request.headers, body)
        except VerificationError as exc:
            _log.info("webhook_rejected reason=%s", exc.code)
            return _error(401, exc.code, str(exc))
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "malformed_json", "body is not valid JSON")
        except RecursionError:
            # Nesting deeper than the parser's recursion limit is refused like bad JSON: a
            # 400 ends the sender's retries, where a 500 would make it try again for days.
            return _error(400, "malformed_json", "body is nested too deeply")
        if not isinstance(payload, dict):
            return _error(400, "malformed_json", "body is not a JSON object")

        webhook_id = verified.webhook_id
        state = await claim(webhook_id)
        if state is Claim.IN_PROGRESS:
            return web.json_response(
                {"status": "in_progress"}, status=503, headers={"Retry-After": "1"}
            )
        if state is Claim.DONE:
            return web.json_response({"status": "duplicate"})
        try:
            await process(payload, request.headers)
            if finish is not None:
                await finish(webhook_id)
        except BaseException as exc:
            await store.forget(webhook_id)
            if not isinstance(exc, Exception):
                raise  # cancellation and friends propagate; the id is already forgotten
            _log.exception("webhook_process_failed webhook_id=%s", webhook_id)
            return _error(500, "processing_failed", "the receiver could not process the event")
        finally:
            in_progress.discard(webhook_id)
        return web.json_response({"status": "ok"})

    return _continuing_trace(handle)


def _continuing_trace(handler: typedefs.Handler) -> typedefs.Handler:
    """``handler`` inside a server span that continues the request's ``traceparent`` (under
    the application's own tracer provider); as it is without OpenTelemetry installed."""

    async def traced(request: web.Request) -> web.StreamResponse:
        with tracing.continued(request.headers, "webhook receive") as span:
            response = await handler(request)
            if span is not None:
                span.set_attribute("http.response.status_code", response.status)
            return response

    return traced
