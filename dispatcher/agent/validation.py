"""Validation of ``POST /api/v1/lead-qualification`` bodies, as a pure function.

Every rejection names the offending field (``prospects[2].email``) so a caller can fix the
request without guessing. Nothing here does I/O; the SSRF check on ``webhook_url`` is the
same literal-address policy the dispatcher applies when it sends.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from dispatcher import ssrf

# Pragmatic, not RFC 5322: one @, a dotted domain of letters/digits/hyphens, a 2+ letter TLD.
_EMAIL_RE = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}"
    r"@(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
MAX_EMAIL_LENGTH = 254
MAX_URL_LENGTH = 2048
MAX_INDUSTRY_LENGTH = 100
MAX_COMPANY_SIZE = 10_000_000
TOP_LEVEL_FIELDS = frozenset({"prospects", "criteria", "webhook_url"})
CRITERIA_FIELDS = frozenset({"min_company_size", "industry"})
PROSPECT_FIELDS = frozenset({"email"})


class ValidationError(Exception):
    """A request the agent will not accept; ``field`` says where, ``detail`` says why."""

    def __init__(self, field: str, detail: str, *, code: str = "invalid_request") -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail
        self.code = code

    def body(self) -> dict[str, str]:
        return {"error": self.code, "field": self.field, "detail": self.detail}


@dataclasses.dataclass(frozen=True, slots=True)
class JobRequest:
    prospects: list[dict[str, Any]]
    criteria: dict[str, Any]
    webhook_url: str


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _unknown(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        name = f"{where}.{extra[0]}" if where else extra[0]
        raise ValidationError(name, "unknown field", code="unknown_field")


def validate_email(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {_type_name(value)}")
    email = value.strip()
    if not email:
        raise ValidationError(field, "must not be empty")
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL_RE.fullmatch(email):
        raise ValidationError(field, "is not a valid email address", code="invalid_email")
    local, _, domain = email.rpartition("@")
    # Domains are case-insensitive; keeping them lower-case makes enrichment stable.
    return f"{local}@{domain.lower()}"


def validate_webhook_url(value: Any, policy: ssrf.AddressPolicy) -> str:
    field = "webhook_url"
    if value is None:
        raise ValidationError(field, "is required", code="missing_field")
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {_type_name(value)}")
    if not value:
        raise ValidationError(field, "must not be empty")
    if len(value) > MAX_URL_LENGTH:
        raise ValidationError(field, f"must be at most {MAX_URL_LENGTH} characters")
    if value != value.strip() or any(c.isspace() for c in value):
        raise ValidationError(field, "must not contain whitespace", code="invalid_url")
    try:
        ssrf.check_url(value, policy)
    except ssrf.InvalidUrlError as exc:
        raise ValidationError(field, str(exc), code="invalid_url") from None
    except ssrf.BlockedAddressError as exc:
        raise ValidationError(field, str(exc), code="blocked_url") from None
    return value


def validate_criteria(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError("criteria", f"must be an object, got {_type_name(value)}")
    _unknown(value, CRITERIA_FIELDS, "criteria")
    out: dict[str, Any] = {}
    if "min_company_size" in value:
        size = value["min_company_size"]
        # bool is an int subclass; true is not a company size.
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValidationError(
                "criteria.min_company_size", f"must be an integer, got {_type_name(size)}"
            )
        if not 0 <= size <= MAX_COMPANY_SIZE:
            raise ValidationError(
                "criteria.min_company_size", f"must be between 0 and {MAX_COMPANY_SIZE}"
            )
        out["min_company_size"] = size
    if "industry" in value:
        industry = value["industry"]
        if not isinstance(industry, str):
            raise ValidationError(
                "criteria.industry", f"must be a string, got {_type_name(industry)}"
            )
        if not industry.strip():
            raise ValidationError("criteria.industry", "must not be empty")
        if len(industry) > MAX_INDUSTRY_LENGTH:
            raise ValidationError(
                "criteria.industry", f"must be at most {MAX_INDUSTRY_LENGTH} characters"
            )
        out["industry"] = industry.strip()
    return out


def validate_prospects(value: Any, max_prospects: int) -> list[dict[str, Any]]:
    if value is None:
        raise ValidationError("prospects", "is required", code="missing_field")
    if not isinstance(value, list):
        raise ValidationError("prospects", f"must be an array, got {_type_name(value)}")
    if not value:
        raise ValidationError("prospects", "must contain at least one prospect")
    if len(value) > max_prospects:
        raise ValidationError(
            "prospects",
            f"has {len(value)} entries; at most {max_prospects} per job",
            code="too_many_prospects",
        )
    out = []
    for index, item in enumerate(value):
        where = f"prospects[{index}]"
        if not isinstance(item, dict):
            raise ValidationError(where, f"must be an object, got {_type_name(item)}")
        _unknown(item, PROSPECT_FIELDS, where)
        if "email" not in item:
            raise ValidationError(f"{where}.email", "is required", code="missing_field")
        out.append({"email": validate_email(item["email"], f"{where}.email")})
    return out


def validate(body: Any, *, max_prospects: int, policy: ssrf.AddressPolicy) -> JobRequest:
    """Check a parsed JSON body; raise ``ValidationError`` at the first problem."""
    if not isinstance(body, dict):
        raise ValidationError("body", f"must be a JSON object, got {_type_name(body)}")
    _unknown(body, TOP_LEVEL_FIELDS, "")
    prospects = validate_prospects(body.get("prospects"), max_prospects)
    criteria = validate_criteria(body.get("criteria"))
    url = validate_webhook_url(body.get("webhook_url"), policy)
    return JobRequest(prospects=prospects, criteria=criteria, webhook_url=url)
