"""Validation of ``POST /api/v1/lead-qualification`` bodies, as a pure function.

Every rejection names the offending field (``prospects[2].email``) so a caller can fix the
request without guessing. Rejections are the dispatcher's one ``ValidationError`` (code, field,
detail), and ``webhook_url`` goes through the dispatcher's own URL validator (length, NUL,
scheme, the SSRF policy it applies when it sends), so the agent cannot accept a callback URL
that ``/v1`` would refuse. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from dispatcher import ssrf, validation

# Pragmatic, not RFC 5322: one @, a dotted domain of letters/digits/hyphens, a 2+ letter TLD.
_EMAIL_RE = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}"
    r"@(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
MAX_EMAIL_LENGTH = 254
MAX_URL_LENGTH = validation.MAX_URL_LENGTH
MAX_INDUSTRY_LENGTH = 100
MAX_COMPANY_SIZE = 10_000_000
TOP_LEVEL_FIELDS = frozenset({"prospects", "criteria", "webhook_url"})
CRITERIA_FIELDS = frozenset({"min_company_size", "industry"})
PROSPECT_FIELDS = frozenset({"email"})


ValidationError = validation.ValidationError


def _invalid(field: str, detail: str, *, code: str = "invalid_request") -> ValidationError:
    return validation.ValidationError(code, field, detail)


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
        raise _invalid(name, "unknown field", code="unknown_field")


def validate_email(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _invalid(field, f"must be a string, got {_type_name(value)}")
    email = value.strip()
    if not email:
        raise _invalid(field, "must not be empty")
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL_RE.fullmatch(email):
        raise _invalid(field, "is not a valid email address", code="invalid_email")
    local, _, domain = email.rpartition("@")
    # Domains are case-insensitive; keeping them lower-case makes enrichment stable.
    return f"{local}@{domain.lower()}"


def validate_webhook_url(value: Any, policy: ssrf.AddressPolicy) -> str:
    field = "webhook_url"
    if value is None:
        raise _invalid(field, "is required", code="missing_field")
    if not isinstance(value, str):
        raise _invalid(field, f"must be a string, got {_type_name(value)}")
    if not value:
        raise _invalid(field, "must not be empty")
    if len(value) > MAX_URL_LENGTH:
        raise _invalid(field, f"must be at most {MAX_URL_LENGTH} characters")
    if value != value.strip() or any(c.isspace() for c in value):
        raise _invalid(field, "must not contain whitespace", code="invalid_url")
    # Codes invalid_url/blocked_url, as /v1 answers for a subscription URL.
    return validation.validate_url(value, policy, field)


def validate_criteria(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("criteria", f"must be an object, got {_type_name(value)}")
    _unknown(value, CRITERIA_FIELDS, "criteria")
    out: dict[str, Any] = {}
    if "min_company_size" in value:
        size = value["min_company_size"]
        # bool is an int subclass; true is not a company size.
        if isinstance(size, bool) or not isinstance(size, int):
            raise _invalid(
                "criteria.min_company_size", f"must be an integer, got {_type_name(size)}"
            )
        if not 0 <= size <= MAX_COMPANY_SIZE:
            raise _invalid("criteria.min_company_size", f"must be between 0 and {MAX_COMPANY_SIZE}")
        out["min_company_size"] = size
    if "industry" in value:
        industry = value["industry"]
        if not isinstance(industry, str):
            raise _invalid("criteria.industry", f"must be a string, got {_type_name(industry)}")
        if not industry.strip():
            raise _invalid("criteria.industry", "must not be empty")
        if len(industry) > MAX_INDUSTRY_LENGTH:
            raise _invalid("criteria.industry", f"must be at most {MAX_INDUSTRY_LENGTH} characters")
        out["industry"] = industry.strip()
    return out


def validate_prospects(value: Any, max_prospects: int) -> list[dict[str, Any]]:
    if value is None:
        raise _invalid("prospects", "is required", code="missing_field")
    if not isinstance(value, list):
        raise _invalid("prospects", f"must be an array, got {_type_name(value)}")
    if not value:
        raise _invalid("prospects", "must contain at least one prospect")
    if len(value) > max_prospects:
        raise _invalid(
            "prospects",
            f"has {len(value)} entries; at most {max_prospects} per job",
            code="too_many_prospects",
        )
    out = []
    for index, item in enumerate(value):
        where = f"prospects[{index}]"
        if not isinstance(item, dict):
            raise _invalid(where, f"must be an object, got {_type_name(item)}")
        _unknown(item, PROSPECT_FIELDS, where)
        if "email" not in item:
            raise _invalid(f"{where}.email", "is required", code="missing_field")
        out.append({"email": validate_email(item["email"], f"{where}.email")})
    return out


def validate(body: Any, *, max_prospects: int, policy: ssrf.AddressPolicy) -> JobRequest:
    """Check a parsed JSON body; raise ``ValidationError`` at the first problem."""
    if not isinstance(body, dict):
        raise _invalid("body", f"must be a JSON object, got {_type_name(body)}")
    _unknown(body, TOP_LEVEL_FIELDS, "")
    prospects = validate_prospects(body.get("prospects"), max_prospects)
    criteria = validate_criteria(body.get("criteria"))
    url = validate_webhook_url(body.get("webhook_url"), policy)
    return JobRequest(prospects=prospects, criteria=criteria, webhook_url=url)
