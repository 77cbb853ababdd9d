"""Frozen, validated settings.

Built once by the CLI (the only module that reads the environment) and passed down
explicitly. Secrets are kept out of ``repr`` so a logged settings object leaks nothing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket


class ConfigError(ValueError):
    """A setting has a value the dispatcher cannot run with."""


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:8090``) → (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"listen address {value!r} must look like host:port")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"listen address {value!r} has a non-numeric port") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen address {value!r} has a port outside 0-65535")
    return host, port


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Full-jitter exponential backoff limits (see :mod:`dispatcher.backoff`)."""

    base_seconds: float = 5.0
    cap_seconds: float = 6 * 3600.0
    max_attempts: int = 30
    max_age_seconds: float = 3 * 86400.0
    max_4xx_attempts: int = 3
    retry_after_max_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if self.base_seconds < 0 or self.cap_seconds < self.base_seconds:
            raise ConfigError("retry base must be >= 0 and cap >= base")
        if self.max_attempts < 1 or self.max_4xx_attempts < 1:
            raise ConfigError("max attempts must be >= 1")
        if self.max_age_seconds <= 0 or self.retry_after_max_seconds < 0:
            raise ConfigError("max age must be > 0 and Retry-After clamp >= 0")


@dataclasses.dataclass(frozen=True, slots=True)
class EndpointHealthPolicy:
    """Endpoint health (see :mod:`dispatcher.endpoint_health`): disabling and pausing failing
    subscriptions. A zero disables that mechanism."""

    # A subscription failing continuously this long is disabled (Svix: 5 days).
    disable_after_seconds: float = 5 * 86400.0
    # Circuit breaker: at least this share of at least ``breaker_min_attempts`` attempts in
    # the last ``breaker_window_seconds`` failed (5xx, 429, timeout, connect error) → pause.
    breaker_failure_ratio: float = 0.5
    breaker_min_attempts: int = 10
    breaker_window_seconds: float = 60.0
    # First pause; each failed probe doubles it up to the cap.
    pause_seconds: float = 30.0
    max_pause_seconds: float = 900.0
    interval_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.disable_after_seconds < 0:
            raise ConfigError("disable-after window must be >= 0 (0 = never)")
        if not 0 <= self.breaker_failure_ratio <= 1 or self.breaker_min_attempts < 1:
            raise ConfigError("breaker ratio must be in [0, 1] (0 = off) and min attempts >= 1")
        if self.breaker_window_seconds <= 0 or self.interval_seconds <= 0:
            raise ConfigError("breaker window and health interval must be > 0")
        if self.pause_seconds <= 0 or self.max_pause_seconds < self.pause_seconds:
            raise ConfigError("pause must be > 0 and max pause >= pause")


@dataclasses.dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """What :mod:`dispatcher.retention` prunes, and how gently. Zero keeps forever."""

    # Delivered deliveries (and fully delivered or unmatched outbox events) older than this.
    delivered_seconds: float = 7 * 86400.0
    # Attempt log rows older than this, whatever their delivery's state.
    attempts_seconds: float = 30 * 86400.0
    batch: int = 500
    interval_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.delivered_seconds < 0 or self.attempts_seconds < 0:
            raise ConfigError("retention periods must be >= 0 (0 = keep forever)")
        if self.batch < 1 or self.interval_seconds <= 0:
            raise ConfigError("retention batch must be >= 1 and interval > 0")


@dataclasses.dataclass(frozen=True, slots=True)
class TracingSettings:
    """OpenTelemetry trace export (see :mod:`dispatcher.tracing`), from OpenTelemetry's own
    variables. ``Settings.tracing`` is None while tracing is off."""

    endpoint: str  # the OTLP/HTTP traces URL
    service_name: str = "dispatcher"
    sampler: str = "parentbased_always_on"
    sampler_ratio: float = 1.0
    export_delay_seconds: float = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class LogSettings:
    """How every command logs (see :mod:`dispatcher.logs`)."""

    level: str = "info"
    # json, console, or auto (console on a terminal).
    format: str = "auto"


# Endpoints outside /v1 that may be left open (DISPATCHER_OPEN_ENDPOINTS).
PROBE_ENDPOINTS = ("healthz", "readyz", "metrics")


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``dispatcher run`` needs. Defaults are production defaults."""

    database_url: str = dataclasses.field(repr=False, default="")
    listen_host: str = "127.0.0.1"
    listen_port: int = 8090
    worker_id: str = dataclasses.field(default_factory=default_worker_id)
    # Requests on the wire from this process, all subscriptions together.
    max_in_flight: int = 256
    # Most deliveries one claim statement may take.
    claim_batch: int = 200
    # Deliveries claimed ahead of free request slots, each started the moment a request
    # ends; at most max_in_flight of them (``held_ahead``).
    prefetch: int = 256
    # Fallback wake-up when no NOTIFY arrives (lost notification, retries coming due).
    poll_interval_seconds: float = 1.0
    route_batch: int = 500
    connect_timeout_seconds: float = 3.0
    request_timeout_seconds: float = 10.0
    # Responses are read up to this many bytes; the attempt log keeps a shorter prefix.
    response_max_bytes: int = 64 * 1024
    response_log_bytes: int = 1024
    # Extra time a lease outlives the request deadline before the delivery is reclaimed.
    lease_margin_seconds: float = 30.0
    shutdown_grace_seconds: float = 20.0
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    # Metrics label at most this many subscriptions; the rest become subscription="other".
    metrics_max_subscriptions: int = 100
    gauge_interval_seconds: float = 5.0
    # Operational events: past this many dispatcher.delivery.dead per subscription and
    # minute, the rest collapse into one dispatcher.deliveries.dead_summary (0 = only that).
    dead_events_per_minute: int = 60
    admin_token: str = dataclasses.field(repr=False, default="")
    # Which of /healthz, /readyz, /metrics answer without the admin token (by name).
    open_endpoints: tuple[str, ...] = ("healthz", "readyz", "metrics")
    # SSRF guard: non-global destinations are refused unless inside one of these CIDRs.
    allow_cidrs: tuple[str, ...] = ()
    https_only: bool = False
    # Ack writer: most results written per statement.
    ack_batch: int = 500
    # Subscription secrets at rest: "kid:base64key,…", first = current (dispatcher.secretbox).
    secret_keys: str = dataclasses.field(repr=False, default="")
    endpoint_health: EndpointHealthPolicy = dataclasses.field(default_factory=EndpointHealthPolicy)
    retention: RetentionPolicy = dataclasses.field(default_factory=RetentionPolicy)
    # None: tracing off (no OTLP endpoint configured).
    tracing: TracingSettings | None = None

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.claim_batch < 1 or self.route_batch < 1:
            raise ConfigError("max_in_flight, claim_batch and route_batch must be >= 1")
        if self.prefetch < 0:
            raise ConfigError("prefetch must be >= 0")
        if self.poll_interval_seconds <= 0:
            raise ConfigError("poll interval must be > 0")
        if self.connect_timeout_seconds <= 0 or self.request_timeout_seconds <= 0:
            raise ConfigError("timeouts must be > 0")
        if self.connect_timeout_seconds > self.request_timeout_seconds:
            raise ConfigError("connect timeout must not exceed the request timeout")
        if self.lease_margin_seconds <= 0:
            raise ConfigError("lease margin must be > 0")
        if self.shutdown_grace_seconds < 0:
            raise ConfigError("shutdown grace must be >= 0")
        if self.metrics_max_subscriptions < 0:
            raise ConfigError("metrics_max_subscriptions must be >= 0")
        if self.gauge_interval_seconds <= 0:
            raise ConfigError("gauge interval must be > 0")
        if self.dead_events_per_minute < 0:
            raise ConfigError("dead events per minute must be >= 0")
        if not self.admin_token and not is_loopback_host(self.listen_host):
            # The admin API can rewrite subscriptions; it is never served open to a network.
            raise ConfigError(
                f"DISPATCHER_ADMIN_TOKEN is required when listening on {self.listen_host} "
                "(a non-loopback address); set it, or listen on 127.0.0.1"
            )
        unknown = set(self.open_endpoints) - set(PROBE_ENDPOINTS)
        if unknown:
            raise ConfigError(
                f"open endpoints must be among {', '.join(PROBE_ENDPOINTS)}; "
                f"got {', '.join(sorted(unknown))}"
            )

    @property
    def held_ahead(self) -> int:
        """Deliveries held claimed ahead of the wire: the prefetch, at most max_in_flight."""
        return min(self.prefetch, self.max_in_flight)

    @property
    def lease_seconds(self) -> float:
        """A claimed delivery is reclaimed only after its request could no longer be running."""
        return self.request_timeout_seconds + self.lease_margin_seconds

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
