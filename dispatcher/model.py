"""The data that crosses layers: claimed jobs, attempt results, acks, routing counts and the
delivery states.

Plain values only. This module imports nothing of the project's and no I/O library, so the
database layer, the sender, the claimer and the management code can all share these types
without importing each other (the database layer must never load the HTTP stack).

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
from collections.abc import Mapping

# Headers a subscription's custom headers may not override: the signature and framing ones.
RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "transfer-encoding",
        "connection",
    }
)


class DeliveryState(enum.StrEnum):
    """``webhook_deliveries.state``. String-valued: SQL parameters, JSON and log lines carry
    the same text as before (the database CHECK lists the same values)."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    DEAD = "dead"
    PARKED = "parked"
    CANCELLED = "cancelled"


# Waiting to be sent or on the wire: the work a subscription still has.
ACTIVE_STATES = (DeliveryState.PENDING, DeliveryState.IN_FLIGHT, DeliveryState.RETRYING)


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
    """The ``outcome`` label of ``dispatcher_attempts_total`` (a metrics contract)."""

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


# Job and Ack are built once per delivery and never changed afterwards, but are not frozen:
# a frozen dataclass's __init__ sets each field through object.__setattr__, ~4 us for a Job
# and ~2 us for an Ack against ~0.4 us unfrozen (a few % of a delivery's CPU).
@dataclasses.dataclass(slots=True)
class Job:
    """One claimed delivery: everything needed to send it and to fence its result."""

    delivery_id: int
    lease_token: int
    attempt: int
    subscription_id: str
    url: str
    event_id: str
    event_type: str
    body: bytes
    secrets: tuple[str, ...] = dataclasses.field(repr=False)
    signature_header: str | None
    signers: tuple[str, ...]
    headers: Mapping[str, str]
    event_created_at: float
    ordering_key: str | None = None
    manual: bool = False
    # The subscription's overrides of the configured retry policy (field name → value).
    retry_policy: Mapping[str, float] | None = None
    # W3C trace context the producer stored with the event, if any.
    traceparent: str | None = None
    tracestate: str | None = None
    # The claim was cut by the subscription's max_in_flight: when this request finishes,
    # claim for it again (its freed slot is the only signal that it can take more).
    capped: bool = False
    # Set when this process owns the subscription (sql/015_slot_owner.sql): its max_in_flight,
    # which the process keeps on the wire whatever it holds claimed. None: the claim itself
    # kept the subscription within its cap (another claimer's rows count, or a probe's one).
    wire_cap: int | None = None
    # Why this row cannot be sent as stored (found while loading it, e.g. a secret sealed under
    # a key this process does not hold); the sender then parks it without a request.
    problem: str | None = None


@dataclasses.dataclass(slots=True)
class Ack:
    """The result of one attempt, to be applied if the lease token still matches."""

    delivery_id: int
    lease_token: int
    attempt: int
    state: DeliveryState  # delivered | retrying | dead | parked
    delay_seconds: float | None
    status: int | None
    error: str | None
    started_at: float
    duration_ms: float
    outcome: str
    response: str | None
    manual: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class RouteStats:
    events: int = 0
    routed: int = 0
    unmatched: int = 0
    unknown_subscription: int = 0
    deliveries: int = 0
    # (traceparent, tracestate) of the routed events that carry a trace context.
    traced: tuple[tuple[str, str | None], ...] = ()
