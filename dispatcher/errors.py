"""Attempt outcomes: what one HTTP attempt came to.

An HTTP attempt never raises: the sender classifies what happened into an ``AttemptResult``
(a ``Verdict`` for the claimer, an ``Outcome`` for the metric label) and only the claimer
decides what follows. Errors live beside what raises them: bad input as ``ValueError``
subclasses (``config.ConfigError``, ``signing.SigningError``, ``ssrf.InvalidUrlError``),
refused management operations as ``db.management.ManagementError`` (``NotFound``,
``Conflict``), database trouble as asyncpg's own errors, grouped in ``db.pool.ERRORS``.
"""

from __future__ import annotations

import dataclasses
import enum


class Verdict(enum.Enum):
    DELIVERED = "delivered"  # 2xx
    RETRYABLE = "retryable"  # timeouts, connection errors, 5xx, 429, 408
    PERMANENT = "permanent"  # other 4xx, 3xx: retried a few times, then dead
    GONE = "gone"  # 410: disable the subscription, park its work
    BLOCKED = "blocked"  # SSRF guard refused the destination: dead at once
    # The request cannot be built from the subscription as stored (a secret sealed under a key
    # this process lacks, a header value HTTP refuses, a signer that fails): parked, not retried,
    # because no retry can fix it until someone changes the configuration.
    UNSENDABLE = "unsendable"


class Outcome(enum.StrEnum):
    """The ``outcome`` label of ``dispatcher_attempts_total`` (DESIGN.md, contract 4)."""

    SUCCESS = "success"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    HTTP_429 = "http_429"
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    TLS_ERROR = "tls_error"
    BLOCKED = "blocked"
    CONFIG_ERROR = "config_error"
    OTHER = "other"


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptResult:
    verdict: Verdict
    outcome: Outcome
    status: int | None
    error: str | None
    duration_seconds: float
    retry_after_seconds: float | None = None
    response_excerpt: str | None = None
