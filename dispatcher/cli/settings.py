"""The settings table: every environment variable the CLI reads, in one place.

Each row names the variable, the settings field it fills, how its text is parsed and a
one-line meaning. The default is not written here: it is read from the settings dataclass
(``config.Settings`` and its policies, ``AgentSettings``, ``config.LogSettings``), so each
default exists once. ``ENVIRONMENT``, the values the context builds the settings from, and the
configuration reference in ``docs/configuration.md`` all derive from this table.

``dispatcher.cli.reference`` writes and checks the generated reference.

Pure: reads no environment itself (the context hands it the mapping) and loads neither the
web stack nor the database driver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Final

from dispatcher import config
from dispatcher.agent import settings as agent_settings
from dispatcher.db import embedded

# The dataclass behind each owner name (None: read by the CLI itself).
OWNERS: Final[dict[str, type[Any]]] = {
    "dispatcher": config.Settings,
    "retry": config.RetryPolicy,
    "endpoint_health": config.EndpointHealthPolicy,
    "retention": config.RetentionPolicy,
    "agent": agent_settings.AgentSettings,
    "log": config.LogSettings,
}
# A field named ``listen`` fills ``listen_host`` and ``listen_port`` from ``host:port``.
LISTEN: Final = "listen"
TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})


class SettingError(ValueError):
    """An environment variable holds text its parser refuses."""


def parse_text(raw: str) -> str:
    return raw


def parse_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SettingError("is not a whole number") from None


def parse_float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise SettingError("is not a number") from None


def parse_bool(raw: str) -> bool:
    word = raw.lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise SettingError("is not a boolean (true/false)")
    return word in TRUE_WORDS


def parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def parse_listen(raw: str) -> tuple[str, int]:
    try:
        return config.parse_listen(raw)
    except config.ConfigError as exc:
        raise SettingError(str(exc)) from None


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable. ``targets`` are ``owner.field`` names it fills."""

    variable: str
    targets: tuple[str, ...]
    parse: Callable[[str], Any]
    doc: str
    # Shown instead of a dataclass default (none exists, or it is computed at run time).
    shown_default: str | None = None
    # Set but empty means "none" instead of "unset" (a list that may be emptied on purpose).
    empty_is_value: bool = False

    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        owner, _, name = self.targets[0].partition(".")
        fields = {f.name: f for f in dataclasses.fields(OWNERS[owner])}
        if name == LISTEN:
            host, port = fields["listen_host"].default, fields["listen_port"].default
            return f"{host}:{port}"
        return render(fields[name].default)


def render(value: Any) -> str:
    """A default as a person would type it into the environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


S = Setting
D = "dispatcher"
AGENT = "`dispatcher agent`: "
TABLE: Final[tuple[Setting, ...]] = (
    S(
        "DATABASE_URL",
        (),
        parse_text,
        "Postgres DSN. Unset: an embedded Postgres under `DISPATCHER_PGDATA`, started for the "
        "command and stopped after it (not in the container image)",
        shown_default="(embedded)",
    ),
    S(
        "DISPATCHER_PGDATA",
        (),
        parse_text,
        "data directory of the embedded Postgres",
        shown_default=str(embedded.DEFAULT_DATA_DIR),
    ),
    S(
        "DISPATCHER_LISTEN",
        (f"{D}.listen",),
        parse_listen,
        "admin listener: `/healthz`, `/readyz`, `/metrics`, `/v1` (`host:port`, IPv6 as "
        "`[::1]:8090`)",
    ),
    S(
        "DISPATCHER_WORKER_ID",
        (
            f"{D}.worker_id",
            "agent.worker_id",
        ),
        parse_text,
        "name recorded on leases and attempts (the Kubernetes manifests use the pod name)",
        shown_default="<hostname>-<pid>",
    ),
    S(
        "DISPATCHER_MAX_IN_FLIGHT",
        (f"{D}.max_in_flight",),
        parse_int,
        "requests on the wire from this process, all subscriptions together (also the HTTP "
        "connection pool size)",
    ),
    S(
        "DISPATCHER_CLAIM_BATCH",
        (f"{D}.claim_batch",),
        parse_int,
        "most deliveries one claim statement takes",
    ),
    S(
        "DISPATCHER_PREFETCH",
        (f"{D}.prefetch",),
        parse_int,
        "deliveries claimed ahead of free request slots, each started the moment a request "
        "ends, so a freed slot does not wait for a database round trip; at most "
        "`DISPATCHER_MAX_IN_FLIGHT`. A subscription this process owns may have up to its "
        "`max_in_flight` of them held beyond its cap, never more than the cap on the wire "
        "(docs/delivery.md#concurrency); 0 turns both off",
    ),
    S(
        "DISPATCHER_POLL_INTERVAL",
        (f"{D}.poll_interval_seconds",),
        parse_float,
        "seconds between polls when no `NOTIFY` arrives",
    ),
    S(
        "DISPATCHER_CONNECT_TIMEOUT",
        (f"{D}.connect_timeout_seconds",),
        parse_float,
        "seconds to connect to a receiver",
    ),
    S(
        "DISPATCHER_REQUEST_TIMEOUT",
        (f"{D}.request_timeout_seconds",),
        parse_float,
        "total deadline of one attempt, reading the response included",
    ),
    S(
        "DISPATCHER_LEASE_MARGIN",
        (f"{D}.lease_margin_seconds",),
        parse_float,
        "a lease lasts the request timeout plus this; a delivery whose worker vanished is retried"
        " after that",
    ),
    S(
        "DISPATCHER_SHUTDOWN_GRACE",
        (f"{D}.shutdown_grace_seconds",),
        parse_float,
        "on SIGTERM, how long to wait for requests on the wire",
    ),
    S(
        "DISPATCHER_RETRY_BASE",
        ("retry.base_seconds",),
        parse_float,
        "full-jitter base: the first retry waits up to this long",
    ),
    S("DISPATCHER_RETRY_CAP", ("retry.cap_seconds",), parse_float, "longest retry delay (6 h)"),
    S(
        "DISPATCHER_MAX_ATTEMPTS",
        ("retry.max_attempts",),
        parse_int,
        "attempts before a delivery is dead",
    ),
    S(
        "DISPATCHER_MAX_AGE",
        ("retry.max_age_seconds",),
        parse_float,
        "no retry is scheduled past this age of the event (3 days)",
    ),
    S(
        "DISPATCHER_MAX_4XX_ATTEMPTS",
        ("retry.max_4xx_attempts",),
        parse_int,
        "attempts in total once a receiver answers a 4xx other than 408/410/429 (or a 1xx/3xx)",
    ),
    S(
        "DISPATCHER_RETRY_AFTER_MAX",
        ("retry.retry_after_max_seconds",),
        parse_float,
        "longest `Retry-After` honoured; longer values are clamped to this",
    ),
    S(
        "DISPATCHER_METRICS_MAX_SUBSCRIPTIONS",
        (f"{D}.metrics_max_subscriptions",),
        parse_int,
        'subscriptions labelled individually in metrics; the rest share `subscription="other"`',
    ),
    S(
        "DISPATCHER_DEAD_EVENTS_PER_MINUTE",
        (f"{D}.dead_events_per_minute",),
        parse_int,
        "dispatcher.delivery.dead events per subscription and minute; the rest are summarized",
    ),
    S(
        "DISPATCHER_GAUGE_INTERVAL",
        (f"{D}.gauge_interval_seconds",),
        parse_float,
        "seconds between refreshes of the database-derived gauges",
    ),
    S(
        "DISPATCHER_ADMIN_TOKEN",
        (f"{D}.admin_token",),
        parse_text,
        "bearer token for `/v1`. Required when `DISPATCHER_LISTEN` is not loopback; unset on "
        "loopback, `/v1` answers 503",
    ),
    S(
        "DISPATCHER_OPEN_ENDPOINTS",
        (f"{D}.open_endpoints",),
        parse_list,
        "which of these answer without the token (the others require it)",
        empty_is_value=True,
    ),
    S(
        "DISPATCHER_ALLOW_CIDRS",
        (
            f"{D}.allow_cidrs",
            "agent.allow_cidrs",
        ),
        parse_list,
        "comma-separated CIDRs the SSRF guard lets through although not globally routable, e.g. "
        "`127.0.0.1/32`",
    ),
    S(
        "DISPATCHER_HTTPS_ONLY",
        (
            f"{D}.https_only",
            "agent.https_only",
        ),
        parse_bool,
        "refuse `http://` subscription URLs (and block clear-text rows at the attempt)",
    ),
    # Read by OpenSSL when the sender's TLS context is built at start, not parsed here.
    S(
        "SSL_CERT_FILE",
        (),
        parse_text,
        "OpenSSL's own variable: a file of the CAs HTTPS receivers are verified against (a "
        "private CA); see [HTTPS receivers](delivery.md#https-receivers)",
        shown_default="(system store)",
    ),
    S(
        "SSL_CERT_DIR",
        (),
        parse_text,
        "OpenSSL's own variable: a directory of hashed CA certificates, as `SSL_CERT_FILE`",
        shown_default="(system store)",
    ),
    S(
        "DISPATCHER_SECRET_KEYS",
        (
            f"{D}.secret_keys",
            "agent.secret_keys",
        ),
        parse_text,
        "subscription secrets at rest: `kid:base64key[,kid:base64key…]`, AES-256-GCM; the first "
        "key seals, every key opens. Empty: secrets stored in plaintext (a warning is logged)",
    ),
    S(
        "DISPATCHER_DISABLE_AFTER",
        ("endpoint_health.disable_after_seconds",),
        parse_float,
        "a subscription failing continuously this long is disabled (5 days; 0 = never)",
    ),
    S(
        "DISPATCHER_BREAKER_RATIO",
        ("endpoint_health.breaker_failure_ratio",),
        parse_float,
        "circuit breaker: failed share of recent attempts that pauses a subscription (0 = off)",
    ),
    S(
        "DISPATCHER_BREAKER_MIN_ATTEMPTS",
        ("endpoint_health.breaker_min_attempts",),
        parse_int,
        "circuit breaker: attempts in the window needed to judge",
    ),
    S(
        "DISPATCHER_BREAKER_WINDOW",
        ("endpoint_health.breaker_window_seconds",),
        parse_float,
        "circuit breaker: seconds of attempts considered",
    ),
    S(
        "DISPATCHER_BREAKER_PAUSE",
        ("endpoint_health.pause_seconds",),
        parse_float,
        "first pause; doubles after each failed probe",
    ),
    S(
        "DISPATCHER_BREAKER_MAX_PAUSE",
        ("endpoint_health.max_pause_seconds",),
        parse_float,
        "longest pause",
    ),
    S(
        "DISPATCHER_HEALTH_INTERVAL",
        ("endpoint_health.interval_seconds",),
        parse_float,
        "seconds between endpoint-health passes",
    ),
    S(
        "DISPATCHER_RETENTION",
        ("retention.delivered_seconds",),
        parse_float,
        "delivered deliveries and finished events are deleted after this (7 days; 0 = keep "
        "forever)",
    ),
    S(
        "DISPATCHER_ATTEMPT_RETENTION",
        ("retention.attempts_seconds",),
        parse_float,
        "attempt-log rows are deleted after this (30 days; 0 = keep forever)",
    ),
    S("DISPATCHER_RETENTION_BATCH", ("retention.batch",), parse_int, "rows per retention batch"),
    S(
        "DISPATCHER_RETENTION_INTERVAL",
        ("retention.interval_seconds",),
        parse_float,
        "seconds between retention passes",
    ),
    S("DISPATCHER_LOG_LEVEL", ("log.level",), parse_text, "`debug`, `info`, `warning`, `error`"),
    S(
        "DISPATCHER_LOG_FORMAT",
        ("log.format",),
        parse_text,
        "`json`, `console`, or `auto` (console on a terminal, JSON otherwise)",
    ),
    # OpenTelemetry's own variables: read together by ``dispatcher.tracing.settings_from_env``
    # (one depends on another), so they fill no field one by one.
    S(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        (),
        parse_text,
        "OpenTelemetry collector base URL (OTLP/HTTP, `/v1/traces` is appended). Empty, and no "
        "traces endpoint: tracing is off. See [traces](observability.md#traces)",
        shown_default="",
    ),
    S(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        (),
        parse_text,
        "full OTLP/HTTP traces URL; wins over the base URL",
        shown_default="",
    ),
    S(
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        (),
        parse_text,
        "the only protocol supported (anything else: exit 2)",
        shown_default="http/protobuf",
    ),
    S(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        (),
        parse_text,
        "the same, for traces only",
        shown_default="http/protobuf",
    ),
    S(
        "OTEL_SERVICE_NAME",
        (),
        parse_text,
        "`service.name` of the dispatcher's spans",
        shown_default="dispatcher",
    ),
    S(
        "OTEL_TRACES_SAMPLER",
        (),
        parse_text,
        "`always_on`, `always_off`, `traceidratio`, or `parentbased_` + one of those (follow "
        "the producer's sampling decision)",
        shown_default="parentbased_always_on",
    ),
    S(
        "OTEL_TRACES_SAMPLER_ARG",
        (),
        parse_text,
        "sampled share for the `traceidratio` samplers",
        shown_default="1.0",
    ),
    S(
        "OTEL_BSP_SCHEDULE_DELAY",
        (),
        parse_text,
        "milliseconds between span exports",
        shown_default="5000",
    ),
    S(
        "OTEL_SDK_DISABLED",
        (),
        parse_text,
        "`true`: no tracing, whatever else is set",
        shown_default="false",
    ),
    S(
        "AGENT_LISTEN",
        ("agent.listen",),
        parse_listen,
        AGENT + "where the lead-qualification API listens",
    ),
    S(
        "AGENT_WEBHOOK_SECRET",
        ("agent.webhook_secret",),
        parse_text,
        AGENT + "signs every callback (`whsec_…` recommended). Keep it stable: callers verify "
        "with it. Unset, the agent exits 2 and prints a freshly generated one to copy",
        shown_default="(required)",
    ),
    S(
        "AGENT_API_KEY",
        ("agent.api_key",),
        parse_text,
        AGENT + "bearer token `/api/v1` requires (empty: open)",
    ),
    S(
        "AGENT_MAX_PROSPECTS",
        ("agent.max_prospects",),
        parse_int,
        AGENT + "most prospects in one job",
    ),
    S(
        "AGENT_MAX_BODY_BYTES",
        ("agent.max_body_bytes",),
        parse_int,
        AGENT + "largest request body accepted (256 KiB)",
    ),
    S(
        "AGENT_STEP_DELAY",
        ("agent.step_delay_seconds",),
        parse_float,
        AGENT + "pause before each job step, so progress is visible",
    ),
    S(
        "AGENT_CONCURRENCY",
        ("agent.concurrency",),
        parse_int,
        AGENT + "jobs one agent process runs at once",
    ),
    S(
        "AGENT_POLL_INTERVAL",
        ("agent.poll_interval_seconds",),
        parse_float,
        AGENT + "seconds between scans for unfinished jobs",
    ),
)
BY_VARIABLE: Final[dict[str, Setting]] = {s.variable: s for s in TABLE}

# Every environment variable the CLI reads: name → (default as shown, meaning).
ENVIRONMENT: Final[dict[str, tuple[str, str]]] = {
    s.variable: (s.default_text(), s.doc) for s in TABLE
}


def parse_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """The variables that are set, parsed: variable → value. Unset (or empty) ones are absent,
    so the dataclass default applies. Raises ``SettingError`` naming the variable."""
    values: dict[str, Any] = {}
    for setting in TABLE:
        raw = env.get(setting.variable)
        if raw is None or (raw == "" and not setting.empty_is_value):
            continue
        try:
            values[setting.variable] = setting.parse(raw)
        except SettingError as exc:
            raise SettingError(f"{setting.variable}={raw!r} {exc}") from None
    return values


def fields_for(owner: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``OWNERS[owner]`` from parsed values (set variables only)."""
    out: dict[str, Any] = {}
    for setting in TABLE:
        if setting.variable not in values:
            continue
        for target in setting.targets:
            target_owner, _, name = target.partition(".")
            if target_owner != owner:
                continue
            if name == LISTEN:
                out["listen_host"], out["listen_port"] = values[setting.variable]
            else:
                out[name] = values[setting.variable]
    return out
