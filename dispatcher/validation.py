"""Validation shared by every entry point: the admin API, the CLI and the reference agent.

Limits, value checks, request-body checks and the listing cursors live here, so ``/v1``, the
CLI and the OpenAPI document accept and describe the same input. A rejection is one
``ValidationError`` carrying a machine-readable ``code``, the offending ``field`` and a
``detail`` for people; each entry point maps it (the API to a 400 problem document, the CLI to
exit status 2 with one line).

Pure: no I/O, no HTTP, no database, no environment. It must not import the web or database
layers (they import it).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import math
import re
import uuid
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Final

import orjson

from dispatcher import config, model, signing

if TYPE_CHECKING:
    from dispatcher import ssrf

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
DELIVERY_STATES: Final = tuple(state.value for state in model.DeliveryState)
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


class ValidationError(ValueError):
    """Input that is refused: ``code`` for machines, ``field`` where, ``detail`` why."""

    def __init__(self, code: str, field: str | None, detail: str) -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.code = code
        self.field = field
        self.detail = detail

    def one_line(self) -> str:
        """The form a command line prints: ``field: detail [code]``."""
        where = f"{self.field}: " if self.field else ""
        return f"{where}{self.detail} [{self.code}]"


def invalid(field: str, detail: str, code: str = "invalid_value") -> ValidationError:
    return ValidationError(code, field, detail)


# -- value checks ----------------------------------------------------------------------------------


def text(value: Any, field: str, *, max_length: int, min_length: int = 0) -> str:
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
    # Imported here: ssrf loads aiohttp (its resolver), and the CLI reads these limits to build
    # its parser, which must stay light.
    from dispatcher import ssrf  # noqa: PLC0415

    url = text(value, field, max_length=MAX_URL_LENGTH, min_length=1)
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
        name = text(item, f"{field}[{i}]", max_length=MAX_EVENT_TYPE_LENGTH, min_length=1)
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
    name = text(value, field, max_length=100, min_length=1)
    if not re.fullmatch(HEADER_NAME_PATTERN, name):
        raise invalid(field, "is not a valid HTTP header name", "invalid_header")
    if name.lower() in model.RESERVED_HEADERS:
        raise invalid(field, f"{name} is set by the dispatcher", "reserved_header")
    return name


def validate_headers(value: Any, field: str = "headers") -> dict[str, str]:
    headers = _object(value, field)
    if len(headers) > MAX_HEADERS:
        raise invalid(field, f"at most {MAX_HEADERS} headers")
    out: dict[str, str] = {}
    for name, raw in headers.items():
        key = _header_name(name, f"{field}.{name}")
        value_text = text(raw, f"{field}.{name}", max_length=MAX_HEADER_VALUE_LENGTH)
        if "\r" in value_text or "\n" in value_text:
            raise invalid(f"{field}.{name}", "must not contain line breaks", "invalid_header")
        out[key] = value_text
    return out


def validate_signature_header(value: Any, field: str = "signature_header") -> str | None:
    return None if value is None else _header_name(value, field)


def validate_signers(
    value: Any, registry: signing.SignerRegistry, field: str = "signers"
) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_SIGNERS:
        raise invalid(field, f"must be an array of at most {MAX_SIGNERS} signer names")
    names = [text(v, f"{field}[{i}]", max_length=100, min_length=1) for i, v in enumerate(value)]
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
        text(key, f"{field}", max_length=MAX_METADATA_KEY_LENGTH, min_length=1)
        text(raw, f"{field}.{key}", max_length=MAX_METADATA_VALUE_LENGTH)
    return dict(metadata)


def validate_secret(value: Any, field: str = "secret") -> str:
    secret = text(value, field, max_length=MAX_SECRET_LENGTH, min_length=1)
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
            out[key] = text(value, key, max_length=MAX_DESCRIPTION_LENGTH)
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
    return text(reason, "reason", max_length=MAX_REASON_LENGTH, min_length=1)


def validate_test_event(body: Mapping[str, Any]) -> dict[str, Any]:
    _reject_unknown(body, ("payload",))
    payload = _object(body.get("payload", {"message": "test event"}), "payload")
    _check_json_strings(payload, "payload")
    return payload


def _check_json_strings(value: Any, field: str) -> None:
    """jsonb cannot hold NUL in strings or keys either."""
    if isinstance(value, str):
        text(value, field, max_length=1 << 20)
    elif isinstance(value, dict):
        for k, v in value.items():
            text(k, field, max_length=1 << 20)
            _check_json_strings(v, f"{field}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_strings(v, f"{field}[{i}]")


def validate_retry_dead(body: Mapping[str, Any]) -> datetime.datetime:
    _reject_unknown(body, ("since",))
    if "since" not in body:
        raise invalid("since", "is required", "required")
    return parse_time(body["since"], "since")


def validate_delivery_filter(query: Mapping[str, str]) -> dict[str, Any]:
    """Listing filters → keyword arguments of ``management.DeliveryFilter``."""
    state = query.get("state")
    if state is not None and state not in DELIVERY_STATES:
        raise invalid("state", f"must be one of {', '.join(DELIVERY_STATES)}")
    event_type = query.get("event_type")
    if event_type is not None:
        text(event_type, "event_type", max_length=MAX_EVENT_TYPE_LENGTH, min_length=1)
    sub = query.get("subscription_id")
    after = query.get("created_after")
    before = query.get("created_before")
    return {
        "subscription_id": parse_uuid(sub, "subscription_id") if sub is not None else None,
        "state": state,
        "event_type": event_type,
        "created_after": parse_time(after, "created_after") if after is not None else None,
        "created_before": parse_time(before, "created_before") if before is not None else None,
    }


def validate_search(query: Mapping[str, str]) -> str | None:
    """The optional ``search`` text of a subscription listing (blank means no search)."""
    raw = query.get("search")
    if raw is None or not raw.strip():
        return None
    return text(raw.strip(), "search", max_length=MAX_SEARCH_LENGTH, min_length=1)


def page_limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit")
    return DEFAULT_PAGE_LIMIT if raw is None else _parse_int(raw, "limit", *PAGE_LIMIT_RANGE)


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


def page_body(
    items: list[dict[str, Any]], next_key: tuple[Any, ...] | None, kind: str
) -> dict[str, Any]:
    """One page of a listing as every listing returns it (API and CLI ``--json``)."""
    return {"items": items, "next_cursor": encode_cursor(kind, next_key)}


def is_delivery_id(value: str) -> bool:
    return bool(re.fullmatch(r"[0-9]{1,19}", value)) and 1 <= int(value) <= MAX_DELIVERY_ID
