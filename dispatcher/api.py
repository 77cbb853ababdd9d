"""The ``/v1`` admin REST API: routes, request validation, bearer auth, problem details.

Validation lives here and is shared with the CLI (``validate_*``), so both reject the same
input with the same machine-readable code and offending field. Every rejection happens before
anything is written; the writes themselves are single statements or transactions in
``dispatcher.db.management``. Errors are RFC 9457 ``application/problem+json``::

    {"type": "urn:dispatcher:problem:<code>", "title": ..., "status": 400,
     "detail": ..., "code": "<code>", "field": "<offending field or null>"}

Auth: every ``/v1`` route needs ``Authorization: Bearer <DISPATCHER_ADMIN_TOKEN>`` (constant
time compare). With no token configured (allowed only on a loopback listener, see
``config.Settings``) ``/v1`` answers 503 ``admin_token_not_configured``: never open.

This module must not hold SQL, read the environment, or log secrets, tokens or bodies.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hmac
import http
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from dispatcher import config, delivery, openapi, signing, ssrf
from dispatcher.db import management

log = structlog.get_logger("dispatcher.api")

PREFIX: Final = "/v1"
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"

# Limits, shared with the OpenAPI document so the two cannot drift.
MAX_URL_LENGTH: Final = 2048
MAX_EVENT_TYPES: Final = 100
MAX_EVENT_TYPE_LENGTH: Final = 200
# Exact names (``order.created``), prefix wildcards (``order.*``) or everything (``*``).
EVENT_TYPE_PATTERN: Final = r"^(\*|[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*(\.\*)?)$"
HEADER_NAME_PATTERN: Final = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$"
MAX_HEADERS: Final = 50
MAX_HEADER_VALUE_LENGTH: Final = 1000
MAX_IN_FLIGHT_RANGE: Final = (1, 10000)
MAX_RATE_PER_SECOND: Final = 10000.0
MAX_DESCRIPTION_LENGTH: Final = 1000
MAX_METADATA_KEYS: Final = 50
MAX_METADATA_KEY_LENGTH: Final = 100
MAX_METADATA_VALUE_LENGTH: Final = 1000
MAX_SECRET_LENGTH: Final = 200
MAX_SIGNERS: Final = 10
MAX_REASON_LENGTH: Final = 500
MAX_GRACE_SECONDS: Final = 7 * 86400
DEFAULT_GRACE_SECONDS: Final = 86400
MAX_EVENT_ID_LENGTH: Final = 200
MAX_SEARCH_LENGTH: Final = 200
PAGE_LIMIT_RANGE: Final = (1, 200)
DEFAULT_PAGE_LIMIT: Final = 50
MAX_DELIVERY_ID: Final = 2**63 - 1
DELIVERY_STATES: Final = (
    "pending",
    "in_flight",
    "retrying",
    "delivered",
    "dead",
    "parked",
    "cancelled",
)
# name → (JSON type, minimum, maximum); the override is merged over the configured policy.
RETRY_POLICY_FIELDS: Final[dict[str, tuple[str, float, float]]] = {
    "max_attempts": ("integer", 1, 1000),
    "max_4xx_attempts": ("integer", 1, 1000),
    "base_seconds": ("number", 0, 86400),
    "cap_seconds": ("number", 0, 30 * 86400),
    "max_age_seconds": ("number", 1, 30 * 86400),
    "retry_after_max_seconds": ("number", 0, 86400),
}
# RFC 3339 date-time, as the OpenAPI ``format: date-time`` means it.
_DATE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII
)


class ProblemError(Exception):
    """A request the API answers with a problem document instead of a result."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})


def invalid(field: str, detail: str, code: str = "invalid_value") -> ProblemError:
    return ProblemError(400, code, detail, field=field)


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {
        "type": f"urn:dispatcher:problem:{code}",
        "title": http.HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        "field": field,
    }
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


# -- value checks (shared with the CLI) ---------------------------------------------------------


def _text(value: Any, field: str, *, max_length: int, min_length: int = 0) -> str:
    if not isinstance(value, str):
        raise invalid(field, "must be a string", "invalid_type")
    if "\x00" in value:
        # Postgres text cannot hold NUL; reject it here instead of failing in the database.
        raise invalid(field, "must not contain NUL characters")
    if not min_length <= len(value) <= max_length:
        raise invalid(field, f"length must be between {min_length} and {max_length}")
    return value


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise invalid(field, "must be an integer", "invalid_type")
    if not low <= value <= high:
        raise invalid(field, f"must be between {low} and {high}", "out_of_range")
    return value


def _number(
    value: Any, field: str, low: float, high: float, *, low_exclusive: bool = False
) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise invalid(field, "must be a number", "invalid_type")
    too_low = value <= low if low_exclusive else value < low
    if too_low or value > high:
        bound = f"greater than {low:g}" if low_exclusive else f"at least {low:g}"
        raise invalid(field, f"must be {bound} and at most {high:g}", "out_of_range")
    return float(value)


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(field, "must be an object", "invalid_type")
    return value


def validate_url(value: Any, policy: ssrf.AddressPolicy, field: str = "url") -> str:
    url = _text(value, field, max_length=MAX_URL_LENGTH, min_length=1)
    try:
        ssrf.check_url(url, policy)
    except ssrf.InvalidUrlError as exc:
        raise invalid(field, str(exc), "invalid_url") from None
    except ssrf.BlockedAddressError as exc:
        raise invalid(field, str(exc), "blocked_url") from None
    return url


def validate_event_types(value: Any, field: str = "event_types") -> list[str]:
    if not isinstance(value, list):
        raise invalid(field, "must be an array of event types", "invalid_type")
    if not 1 <= len(value) <= MAX_EVENT_TYPES:
        raise invalid(field, f"must list between 1 and {MAX_EVENT_TYPES} event types")
    out: list[str] = []
    for i, item in enumerate(value):
        name = _text(item, f"{field}[{i}]", max_length=MAX_EVENT_TYPE_LENGTH, min_length=1)
        if not re.fullmatch(EVENT_TYPE_PATTERN, name):
            raise invalid(
                f"{field}[{i}]",
                "must be an exact type (a.b), a prefix wildcard (a.*) or *",
                "invalid_event_type",
            )
        if name not in out:
            out.append(name)
    return out


def _header_name(value: Any, field: str) -> str:
    name = _text(value, field, max_length=100, min_length=1)
    if not re.fullmatch(HEADER_NAME_PATTERN, name):
        raise invalid(field, "is not a valid HTTP header name", "invalid_header")
    if name.lower() in delivery.RESERVED_HEADERS:
        raise invalid(field, f"{name} is set by the dispatcher", "reserved_header")
    return name


def validate_headers(value: Any, field: str = "headers") -> dict[str, str]:
    headers = _object(value, field)
    if len(headers) > MAX_HEADERS:
        raise invalid(field, f"at most {MAX_HEADERS} headers")
    out: dict[str, str] = {}
    for name, raw in headers.items():
        key = _header_name(name, f"{field}.{name}")
        text = _text(raw, f"{field}.{name}", max_length=MAX_HEADER_VALUE_LENGTH)
        if "\r" in text or "\n" in text:
            raise invalid(f"{field}.{name}", "must not contain line breaks", "invalid_header")
        out[key] = text
    return out


def validate_signature_header(value: Any, field: str = "signature_header") -> str | None:
    return None if value is None else _header_name(value, field)


def validate_signers(
    value: Any, registry: signing.SignerRegistry, field: str = "signers"
) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_SIGNERS:
        raise invalid(field, f"must be an array of at most {MAX_SIGNERS} signer names")
    names = [_text(v, f"{field}[{i}]", max_length=100, min_length=1) for i, v in enumerate(value)]
    for i, name in enumerate(names):
        try:
            registry.get(name)
        except signing.SigningError as exc:
            raise invalid(f"{field}[{i}]", str(exc), "unknown_signer") from None
    return list(dict.fromkeys(names))


def validate_retry_policy(value: Any, field: str = "retry_policy") -> dict[str, Any] | None:
    if value is None:
        return None
    policy = _object(value, field)
    out: dict[str, Any] = {}
    for key, raw in policy.items():
        spec = RETRY_POLICY_FIELDS.get(key)
        if spec is None:
            raise invalid(f"{field}.{key}", "is not a retry policy field", "unknown_field")
        kind, low, high = spec
        if kind == "integer":
            out[key] = _integer(raw, f"{field}.{key}", int(low), int(high))
        else:
            out[key] = _number(raw, f"{field}.{key}", low, high)
    try:
        config.RetryPolicy(**out)
    except config.ConfigError as exc:
        raise invalid(field, str(exc), "invalid_retry_policy") from None
    return out


def validate_metadata(value: Any, field: str = "metadata") -> dict[str, str]:
    metadata = _object(value, field)
    if len(metadata) > MAX_METADATA_KEYS:
        raise invalid(field, f"at most {MAX_METADATA_KEYS} keys")
    for key, raw in metadata.items():
        _text(key, f"{field}", max_length=MAX_METADATA_KEY_LENGTH, min_length=1)
        _text(raw, f"{field}.{key}", max_length=MAX_METADATA_VALUE_LENGTH)
    return dict(metadata)


def validate_secret(value: Any, field: str = "secret") -> str:
    secret = _text(value, field, max_length=MAX_SECRET_LENGTH, min_length=1)
    try:
        signing.validate_secret(secret)
    except signing.SigningError as exc:
        raise invalid(field, str(exc), "invalid_secret") from None
    return secret


def parse_uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid(field, "must be a UUID", "invalid_uuid") from None


def parse_time(value: str, field: str) -> datetime.datetime:
    """An RFC 3339 date-time (``2024-05-01T12:00:00Z``)."""
    if not isinstance(value, str) or not _DATE_TIME.fullmatch(value):
        raise invalid(field, "must be an RFC 3339 date-time, e.g. 2024-05-01T12:00:00Z")
    try:
        return datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise invalid(field, "is not a valid date-time") from None


def _parse_int(value: str, field: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", value):
        raise invalid(field, "must be an integer", "invalid_type")
    return _integer(int(value), field, low, high)


def _reject_unknown(body: Mapping[str, Any], allowed: Collection[str]) -> None:
    for key in body:
        if key not in allowed:
            raise invalid(str(key), "is not a known field", "unknown_field")


CREATE_FIELDS: Final = (
    "url",
    "event_types",
    "secret",
    "headers",
    "signature_header",
    "signers",
    "max_in_flight",
    "rate_limit_per_second",
    "retry_policy",
    "description",
    "metadata",
)
UPDATE_FIELDS: Final = tuple(f for f in CREATE_FIELDS if f != "secret")


def _validate_fields(
    body: Mapping[str, Any], policy: ssrf.AddressPolicy, registry: signing.SignerRegistry
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key == "url":
            out[key] = validate_url(value, policy)
        elif key == "event_types":
            out[key] = validate_event_types(value)
        elif key == "secret":
            out[key] = validate_secret(value)
        elif key == "headers":
            out[key] = validate_headers(value)
        elif key == "signature_header":
            out[key] = validate_signature_header(value)
        elif key == "signers":
            out[key] = validate_signers(value, registry)
        elif key == "max_in_flight":
            out[key] = _integer(value, key, *MAX_IN_FLIGHT_RANGE)
        elif key == "rate_limit_per_second":
            out[key] = (
                None
                if value is None
                else _number(value, key, 0, MAX_RATE_PER_SECOND, low_exclusive=True)
            )
        elif key == "retry_policy":
            out[key] = validate_retry_policy(value)
        elif key == "description":
            out[key] = _text(value, key, max_length=MAX_DESCRIPTION_LENGTH)
        elif key == "metadata":
            out[key] = validate_metadata(value)
    return out


def validate_subscription_create(
    body: Mapping[str, Any], policy: ssrf.AddressPolicy, registry: signing.SignerRegistry
) -> dict[str, Any]:
    """A create request → keyword arguments for ``Repository.create_subscription``."""
    _reject_unknown(body, CREATE_FIELDS)
    for required in ("url", "event_types"):
        if required not in body:
            raise invalid(required, "is required", "required")
    spec = _validate_fields(body, policy, registry)
    spec.setdefault("secret", signing.generate_secret())
    return spec


def validate_subscription_update(
    body: Mapping[str, Any], policy: ssrf.AddressPolicy, registry: signing.SignerRegistry
) -> dict[str, Any]:
    """A partial update: only the fields present change; ``null`` clears the nullable ones."""
    _reject_unknown(body, UPDATE_FIELDS)
    if not body:
        raise invalid("body", "name at least one field to change", "empty_update")
    for key in ("url", "event_types", "headers", "signers", "max_in_flight", "description"):
        if key in body and body[key] is None:
            raise invalid(key, "must not be null", "invalid_type")
    if "metadata" in body and body["metadata"] is None:
        raise invalid("metadata", "must not be null", "invalid_type")
    return _validate_fields(body, policy, registry)


def validate_rotation(body: Mapping[str, Any]) -> tuple[str, int]:
    """→ (new secret, grace seconds)."""
    _reject_unknown(body, ("secret", "grace_period_seconds"))
    secret = validate_secret(body["secret"]) if "secret" in body else signing.generate_secret()
    grace = body.get("grace_period_seconds", DEFAULT_GRACE_SECONDS)
    return secret, _integer(grace, "grace_period_seconds", 0, MAX_GRACE_SECONDS)


def validate_disable(body: Mapping[str, Any]) -> str:
    _reject_unknown(body, ("reason",))
    reason = body.get("reason", "disabled by an operator")
    return _text(reason, "reason", max_length=MAX_REASON_LENGTH, min_length=1)


def validate_test_event(body: Mapping[str, Any]) -> dict[str, Any]:
    _reject_unknown(body, ("payload",))
    payload = _object(body.get("payload", {"message": "test event"}), "payload")
    _check_json_strings(payload, "payload")
    return payload


def _check_json_strings(value: Any, field: str) -> None:
    """jsonb cannot hold NUL in strings or keys either."""
    if isinstance(value, str):
        _text(value, field, max_length=1 << 20)
    elif isinstance(value, dict):
        for k, v in value.items():
            _text(k, field, max_length=1 << 20)
            _check_json_strings(v, f"{field}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_strings(v, f"{field}[{i}]")


def validate_retry_dead(body: Mapping[str, Any]) -> datetime.datetime:
    _reject_unknown(body, ("since",))
    if "since" not in body:
        raise invalid("since", "is required", "required")
    return parse_time(body["since"], "since")


def validate_delivery_filter(query: Mapping[str, str]) -> management.DeliveryFilter:
    state = query.get("state")
    if state is not None and state not in DELIVERY_STATES:
        raise invalid("state", f"must be one of {', '.join(DELIVERY_STATES)}")
    event_type = query.get("event_type")
    if event_type is not None:
        _text(event_type, "event_type", max_length=MAX_EVENT_TYPE_LENGTH, min_length=1)
    sub = query.get("subscription_id")
    after = query.get("created_after")
    before = query.get("created_before")
    return management.DeliveryFilter(
        subscription_id=parse_uuid(sub, "subscription_id") if sub is not None else None,
        state=state,
        event_type=event_type,
        created_after=parse_time(after, "created_after") if after is not None else None,
        created_before=parse_time(before, "created_before") if before is not None else None,
    )


def validate_search(query: Mapping[str, str]) -> str | None:
    """The optional ``search`` text of a subscription listing (blank means no search)."""
    raw = query.get("search")
    if raw is None or not raw.strip():
        return None
    return _text(raw.strip(), "search", max_length=MAX_SEARCH_LENGTH, min_length=1)


def page_limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit")
    return DEFAULT_PAGE_LIMIT if raw is None else _parse_int(raw, "limit", *PAGE_LIMIT_RANGE)


def delivery_id(value: str) -> int:
    """Path ids: anything that is not a delivery id is an unknown delivery (404)."""
    if not re.fullmatch(r"[0-9]{1,19}", value) or not 1 <= int(value) <= MAX_DELIVERY_ID:
        raise management.NotFound(f"delivery {value[:40]!r} does not exist")
    return int(value)


def subscription_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise management.NotFound(f"subscription {value[:40]!r} does not exist") from None


# -- cursors ------------------------------------------------------------------------------------


def encode_cursor(kind: str, key: tuple[Any, ...] | None) -> str | None:
    if key is None:
        return None
    values = [v.isoformat() if isinstance(v, datetime.datetime) else str(v) for v in key]
    raw = orjson.dumps({"k": kind, "v": values})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(query: Mapping[str, str], kind: str) -> list[str] | None:
    text = query.get("cursor")
    if text is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise invalid("cursor", "is not a cursor this API issued", "invalid_cursor") from None
    if (
        not isinstance(data, dict)
        or data.get("k") != kind
        or not isinstance(data.get("v"), list)
        or not all(isinstance(v, str) for v in data["v"])
    ):
        raise invalid("cursor", "is not a cursor for this listing", "invalid_cursor")
    values: list[str] = data["v"]
    return values


def id_cursor(query: Mapping[str, str], kind: str) -> int | None:
    values = decode_cursor(query, kind)
    if values is None:
        return None
    if len(values) != 1 or not re.fullmatch(r"[0-9]{1,19}", values[0]):
        raise invalid("cursor", "is not a cursor for this listing", "invalid_cursor")
    return int(values[0])


def subscription_cursor(query: Mapping[str, str]) -> tuple[datetime.datetime, uuid.UUID] | None:
    values = decode_cursor(query, "subscriptions")
    if values is None:
        return None
    try:
        created, sid = values
        return datetime.datetime.fromisoformat(created), uuid.UUID(sid)
    except ValueError:
        raise invalid("cursor", "is not a cursor for this listing", "invalid_cursor") from None


def page_body(page: management.Page, kind: str) -> dict[str, Any]:
    return {"items": page.items, "next_cursor": encode_cursor(kind, page.next_key)}


# -- HTTP ---------------------------------------------------------------------------------------

MANAGEMENT: web.AppKey[management.Management] = web.AppKey("management", management.Management)
POLICY: web.AppKey[ssrf.AddressPolicy] = web.AppKey("policy", ssrf.AddressPolicy)
SIGNERS: web.AppKey[signing.SignerRegistry] = web.AppKey("signers", signing.SignerRegistry)
TOKEN: web.AppKey[str] = web.AppKey("token", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_matches(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, supplied = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(
        supplied.strip().encode("utf-8", "replace"), token.encode("utf-8", "replace")
    )


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(
        401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="dispatcher"'}
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProblemError as exc:
        return problem_response(
            exc.status, exc.code, exc.detail, field=exc.field, headers=exc.headers
        )
    except management.NotFound as exc:
        return problem_response(404, exc.code, exc.detail)
    except management.Conflict as exc:
        return problem_response(409, exc.code, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return problem_response(
            exc.status, f"http_{exc.status}", exc.reason or "error", headers=headers
        )
    except Exception:
        # Logged with its traceback and answered as a 500 problem; never a silent pass.
        log.exception("api_request_failed", method=request.method, path=request.path)
        return problem_response(500, "internal_error", "the server failed to handle the request")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[TOKEN]
    if not token:
        raise ProblemError(
            503,
            "admin_token_not_configured",
            "the admin API is disabled: set DISPATCHER_ADMIN_TOKEN to enable it",
        )
    header = request.headers.get("Authorization")
    if header is None:
        raise _unauthorized("missing Authorization: Bearer <token> header")
    if not token_matches(header, token):
        raise _unauthorized("invalid bearer token")
    return await handler(request)


def probe_guard(token: str, protected_paths: Collection[str]) -> Any:
    """Middleware for the root app: the probe/metrics paths not configured as open need the
    same bearer token as /v1."""
    protected = frozenset(protected_paths)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in protected and not (
            token and token_matches(request.headers.get("Authorization"), token)
        ):
            return problem_response(
                401,
                "unauthorized",
                "this endpoint requires the admin bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="dispatcher"'},
            )
        return await handler(request)

    return guard


async def _body(request: web.Request, *, required: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise invalid("body", "a JSON object body is required", "body_required")
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid("body", "is not valid JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("body", "must be a JSON object", "invalid_body")
    return data


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _openapi(request: web.Request) -> web.Response:
    return _json(openapi.document())


async def _create_subscription(request: web.Request) -> web.Response:
    body = await _body(request, required=True)
    spec = validate_subscription_create(body, request.app[POLICY], request.app[SIGNERS])
    created = await request.app[MANAGEMENT].create_subscription(spec)
    log.info("subscription_created", subscription=created["id"])
    return _json(created, 201)


async def _list_subscriptions(request: web.Request) -> web.Response:
    q = request.query
    enabled_raw = q.get("enabled")
    if enabled_raw not in (None, "true", "false"):
        raise invalid("enabled", "must be true or false")
    event_type = q.get("event_type")
    if event_type is not None:
        _text(event_type, "event_type", max_length=MAX_EVENT_TYPE_LENGTH, min_length=1)
    page = await request.app[MANAGEMENT].list_subscriptions(
        limit=page_limit(q),
        after=subscription_cursor(q),
        enabled=None if enabled_raw is None else enabled_raw == "true",
        event_type=event_type,
        search=validate_search(q),
    )
    return _json(page_body(page, "subscriptions"))


async def _get_subscription(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    return _json(await request.app[MANAGEMENT].get_subscription(sid))


async def _update_subscription(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    body = await _body(request, required=True)
    changes = validate_subscription_update(body, request.app[POLICY], request.app[SIGNERS])
    updated = await request.app[MANAGEMENT].update_subscription(sid, changes)
    log.info("subscription_updated", subscription=str(sid), fields=sorted(changes))
    return _json(updated)


async def _delete_subscription(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    await request.app[MANAGEMENT].delete_subscription(sid)
    log.info("subscription_deleted", subscription=str(sid))
    return web.Response(status=204)


async def _enable_subscription(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    await _body(request)
    result = await request.app[MANAGEMENT].enable_subscription(sid)
    log.info("subscription_enabled", subscription=str(sid))
    return _json(result)


async def _disable_subscription(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    reason = validate_disable(await _body(request))
    result = await request.app[MANAGEMENT].disable_subscription(sid, reason)
    log.info("subscription_disabled", subscription=str(sid), reason=reason)
    return _json(result)


async def _rotate_secret(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    secret, grace = validate_rotation(await _body(request))
    result = await request.app[MANAGEMENT].rotate_secret(sid, secret, grace)
    log.info("subscription_secret_rotated", subscription=str(sid), grace_seconds=grace)
    return _json(result)


async def _list_subscription_events(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    q = request.query
    page = await request.app[MANAGEMENT].list_subscription_events(
        sid, limit=page_limit(q), before_id=id_cursor(q, "subscription_events")
    )
    return _json(page_body(page, "subscription_events"))


async def _send_test(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    payload = validate_test_event(await _body(request))
    return _json(await request.app[MANAGEMENT].send_test_event(sid, payload), 202)


async def _retry_dead(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    since = validate_retry_dead(await _body(request, required=True))
    result = await request.app[MANAGEMENT].retry_dead(sid, since)
    log.info("deliveries_replayed", subscription=str(sid), retried=result["retried"])
    return _json(result)


async def _list_deliveries(request: web.Request) -> web.Response:
    q = request.query
    filters = validate_delivery_filter(q)
    page = await request.app[MANAGEMENT].list_deliveries(
        filters, limit=page_limit(q), before_id=id_cursor(q, "deliveries")
    )
    return _json(page_body(page, "deliveries"))


async def _get_delivery(request: web.Request) -> web.Response:
    did = delivery_id(request.match_info["delivery_id"])
    return _json(await request.app[MANAGEMENT].get_delivery(did))


async def _retry_delivery(request: web.Request) -> web.Response:
    did = delivery_id(request.match_info["delivery_id"])
    await _body(request)
    result = await request.app[MANAGEMENT].retry_delivery(did)
    log.info("delivery_retry_requested", delivery_id=did)
    return _json(result, 202)


async def _cancel_delivery(request: web.Request) -> web.Response:
    did = delivery_id(request.match_info["delivery_id"])
    await _body(request)
    result = await request.app[MANAGEMENT].cancel_delivery(did)
    log.info("delivery_cancelled", delivery_id=did)
    return _json(result)


async def _get_event(request: web.Request) -> web.Response:
    event_id = request.match_info["event_id"]
    if "\x00" in event_id or not 1 <= len(event_id) <= MAX_EVENT_ID_LENGTH:
        raise management.NotFound(f"event {event_id[:40]!r} does not exist")
    return _json(await request.app[MANAGEMENT].get_event(event_id))


async def _overview(request: web.Request) -> web.Response:
    return _json(await request.app[MANAGEMENT].overview())


async def _list_unrouted(request: web.Request) -> web.Response:
    q = request.query
    page = await request.app[MANAGEMENT].list_unrouted_events(
        limit=page_limit(q), before_id=id_cursor(q, "events")
    )
    return _json(page_body(page, "events"))


async def _not_found(request: web.Request) -> web.Response:
    raise web.HTTPNotFound(reason="no such route")


# (method, path relative to /v1, handler): the OpenAPI document is checked against this list.
ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("GET", "/openapi.json", _openapi),
    ("POST", "/subscriptions", _create_subscription),
    ("GET", "/subscriptions", _list_subscriptions),
    ("GET", "/subscriptions/{subscription_id}", _get_subscription),
    ("PATCH", "/subscriptions/{subscription_id}", _update_subscription),
    ("DELETE", "/subscriptions/{subscription_id}", _delete_subscription),
    ("POST", "/subscriptions/{subscription_id}/enable", _enable_subscription),
    ("POST", "/subscriptions/{subscription_id}/disable", _disable_subscription),
    ("POST", "/subscriptions/{subscription_id}/rotate-secret", _rotate_secret),
    ("GET", "/subscriptions/{subscription_id}/events", _list_subscription_events),
    ("POST", "/subscriptions/{subscription_id}/test", _send_test),
    ("POST", "/subscriptions/{subscription_id}/retry-dead", _retry_dead),
    ("GET", "/deliveries", _list_deliveries),
    ("GET", "/deliveries/{delivery_id}", _get_delivery),
    ("POST", "/deliveries/{delivery_id}/retry", _retry_delivery),
    ("POST", "/deliveries/{delivery_id}/cancel", _cancel_delivery),
    ("GET", "/unrouted-events", _list_unrouted),
    ("GET", "/overview", _overview),
    ("GET", "/events/{event_id}", _get_event),
)


def build(
    mgmt: management.Management,
    *,
    token: str,
    policy: ssrf.AddressPolicy,
    signers: signing.SignerRegistry,
) -> web.Application:
    """The /v1 sub-application, to be mounted with ``app.add_subapp(PREFIX, ...)``."""
    app = web.Application(middlewares=[_errors, _auth], client_max_size=1024 * 1024)
    app[MANAGEMENT] = mgmt
    app[TOKEN] = token
    app[POLICY] = policy
    app[SIGNERS] = signers
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    # Unknown /v1 paths still go through auth and answer with a problem document.
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app
