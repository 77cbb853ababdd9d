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

# Unix seconds: plain ASCII digits, short enough that int() stays cheap on hostile input.
_TIMESTAMP_RE: Final = re.compile(r"[0-9]{1,12}")
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
    prefix = f"{msg_id}.{timestamp}.".encode()
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
    try:
        offered = bytes.fromhex(header_value[len(BODY_HMAC_PREFIX) :])
    except ValueError:
        raise InvalidSignatureError("body signature is not hex") from None
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

    Keys are derived once; a malformed ``whsec_`` secret fails here, not per request."""

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
        self._standard_keys = tuple(signing.secret_key_bytes(s) for s in items)
        self._body_keys = tuple(s.encode() for s in items)
        self.signature_header = signature_header or None
        self.tolerance_seconds = tolerance_seconds
        self._clock = clock

    def __repr__(self) -> str:
        return (
            f"Verifier(secrets=*** x{len(self._standard_keys)}, "
            f"signature_header={self.signature_header!r})"
        )

    def verify(self, headers: Mapping[str, str], body: bytes) -> Verified:
        """Check Standard Webhooks and, when configured, the body-HMAC header too."""
        msg_id, timestamp = _verify_standard_keys(
            self._standard_keys, headers, body, self.tolerance_seconds, self._clock()
        )
        if self.signature_header is not None:
            value = _header(headers, self.signature_header)
            _verify_body_hmac_keys(self._body_keys, value, body)
        return Verified(msg_id, timestamp, body_hmac=self.signature_header is not None)


class IdempotencyStore(Protocol):
    """Remembers which webhook ids were already accepted."""

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


class PostgresIdempotencyStore:
    """Durable store in one table, so a restarted (or second) receiver still de-duplicates.

    ``pool`` is an ``asyncpg.Pool`` (or anything with ``execute``/``fetchval``)."""

    def __init__(self, pool: asyncpg.Pool, table: str = "webhook_receipts") -> None:
        if not _TABLE_RE.fullmatch(table):
            raise ValueError("table must be a plain identifier, optionally schema-qualified")
        self._pool = pool
        self.table = table

    async def ensure_table(self) -> None:
        await self._pool.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            " webhook_id text PRIMARY KEY,"
            " received_at timestamptz NOT NULL DEFAULT now())"
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
        if not isinstance(payload, dict):
            return _error(400, "malformed_json", "body is not a JSON object")

        webhook_id = verified.webhook_id
        if await store.seen_or_remember(webhook_id):
            if webhook_id in in_progress:
                return web.json_response(
                    {"status": "in_progress"}, status=503, headers={"Retry-After": "1"}
                )
            return web.json_response({"status": "duplicate"})
        in_progress.add(webhook_id)
        try:
            await process(payload, request.headers)
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
