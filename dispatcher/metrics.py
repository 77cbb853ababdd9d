"""Every Prometheus collector, built on an injected ``CollectorRegistry``.

Names and labels are a contract: dashboards and alerts depend on them.
The ``subscription`` label is bounded: after ``max_subscriptions`` distinct ids, the rest are
folded into ``subscription="other"``. No module-level collectors.
"""

from __future__ import annotations

import threading

import prometheus_client as prom

from dispatcher import model

OTHER = "other"
# Longest description carried as a label of dispatcher_subscription_info.
INFO_DESCRIPTION_CHARS = 64
# Webhook attempts: a few ms on a LAN up to the full request timeout.
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)
# End to end: includes queueing and retries, so it runs out to hours.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    21600.0,
    86400.0,
)
# The delivery states the queue gauge reports.
QUEUE_STATES = tuple(state.value for state in (*model.ACTIVE_STATES, model.DeliveryState.DEAD))


class SubscriptionLabels:
    """Maps subscription ids to a bounded set of label values."""

    def __init__(self, max_subscriptions: int) -> None:
        self._max = max_subscriptions
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, subscription_id: str) -> str:
        if subscription_id in self._known:
            return subscription_id
        with self._lock:
            if len(self._known) < self._max:
                self._known.add(subscription_id)
                return subscription_id
        return OTHER


class OnWire:
    """Requests on the wire for one subscription label: a plain number the claimer moves,
    read by ``dispatcher_in_flight`` at scrape time (a gauge inc and dec per delivery each
    took a lock)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> float:
        return self.n


class Metrics:
    def __init__(
        self,
        registry: prom.CollectorRegistry,
        *,
        max_subscriptions: int = 100,
        version: str = "0.1.0",
    ) -> None:
        self.registry = registry
        self.label = SubscriptionLabels(max_subscriptions)
        # No `_created` series: a fifth of the scrape, and nothing here reads it. The switch
        # is process-wide in prometheus_client; every registry here wants it off.
        prom.disable_created_metrics()  # type: ignore[no-untyped-call]
        sub = ["subscription"]
        self.attempts = prom.Counter(
            "dispatcher_attempts_total",
            "HTTP delivery attempts by outcome.",
            [*sub, "outcome"],
            registry=registry,
        )
        self.attempt_duration = prom.Histogram(
            "dispatcher_attempt_duration_seconds",
            "One HTTP attempt, request start to response read.",
            sub,
            buckets=ATTEMPT_BUCKETS,
            registry=registry,
        )
        self.delivery_latency = prom.Histogram(
            "dispatcher_delivery_latency_seconds",
            "Outbox insert to first 2xx response (end to end).",
            sub,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.deliveries = prom.Counter(
            "dispatcher_deliveries_total",
            "Finished deliveries by result.",
            [*sub, "result"],
            registry=registry,
        )
        self.queue_depth = prom.Gauge(
            "dispatcher_queue_depth", "Deliveries by state.", [*sub, "state"], registry=registry
        )
        self.oldest_pending_age = prom.Gauge(
            "dispatcher_oldest_pending_age_seconds",
            "Age of the oldest undelivered delivery.",
            sub,
            registry=registry,
        )
        self.outbox_backlog = prom.Gauge(
            "dispatcher_outbox_backlog", "Outbox rows not yet routed.", registry=registry
        )
        self.in_flight = prom.Gauge(
            "dispatcher_in_flight",
            "Requests on the wire now (this process).",
            sub,
            registry=registry,
        )
        self._on_wire: dict[str, OnWire] = {}
        self.subscription_up = prom.Gauge(
            "dispatcher_subscription_up", "1 healthy, 0 paused or disabled.", sub, registry=registry
        )
        self.retries_scheduled = prom.Counter(
            "dispatcher_retries_scheduled_total",
            "Failed attempts scheduled for a retry.",
            sub,
            registry=registry,
        )
        self.leases_reclaimed = prom.Counter(
            "dispatcher_leases_reclaimed_total",
            "Expired leases returned to the queue (a worker was lost).",
            registry=registry,
        )
        self.claim_failing_seconds = prom.Gauge(
            "dispatcher_claim_failing_seconds",
            "How long this process's claims have been failing without a success (0 while they "
            "succeed).",
            registry=registry,
        )
        self.stale_acks = prom.Counter(
            "dispatcher_stale_acks_total",
            "Results discarded because their lease token no longer matched.",
            registry=registry,
        )
        self.subscriptions_disabled = prom.Counter(
            "dispatcher_subscriptions_disabled_total",
            "Subscriptions disabled by the dispatcher.",
            ["reason"],
            registry=registry,
        )
        self.ssrf_blocked = prom.Counter(
            "dispatcher_ssrf_blocked_total",
            "Attempts refused by the SSRF guard.",
            registry=registry,
        )
        self.events_routed = prom.Counter(
            "dispatcher_events_routed_total",
            "Outbox events routed, by result.",
            ["result"],
            registry=registry,
        )
        self.db_pool_connections = prom.Gauge(
            "dispatcher_db_pool_connections",
            "Database pool connections by state.",
            ["state"],
            registry=registry,
        )
        # The database gauges are refreshed on an interval: these say how fresh and how costly.
        self.gauge_refresh_seconds = prom.Gauge(
            "dispatcher_db_stats_refresh_seconds",
            "Duration of the last database gauge refresh.",
            registry=registry,
        )
        self.gauge_refreshed = prom.Gauge(
            "dispatcher_db_stats_last_refresh_timestamp_seconds",
            "Unix time of the last successful database gauge refresh.",
            registry=registry,
        )
        self.gauge_refresh_errors = prom.Counter(
            "dispatcher_db_stats_refresh_errors_total",
            "Database gauge refreshes that failed.",
            registry=registry,
        )
        # Endpoint health (dispatcher/endpoint_health.py) and retention (dispatcher/retention.py).
        self.health_events = prom.Counter(
            "dispatcher_subscription_health_events_total",
            "Circuit-breaker and auto-disable actions taken by this process.",
            ["event"],
            registry=registry,
        )
        self.subscription_info = prom.Gauge(
            "dispatcher_subscription_info",
            "1 per subscription label: its URL's host and description, for legends.",
            [*sub, "host", "description"],
            registry=registry,
        )
        self.subscription_paused = prom.Gauge(
            "dispatcher_subscription_paused",
            "1 while the circuit breaker pauses the subscription.",
            sub,
            registry=registry,
        )
        self.retention_pruned = prom.Counter(
            "dispatcher_retention_pruned_total",
            "Rows deleted by the retention loop.",
            ["table"],
            registry=registry,
        )
        self.build_info = prom.Gauge(
            "dispatcher_build_info", "Build information.", ["version"], registry=registry
        )
        self.build_info.labels(version=version).set(1)
        for outcome in ("routed", "unmatched", "unknown_subscription"):
            self.events_routed.labels(result=outcome)

    def on_wire(self, label: str) -> OnWire:
        """The count behind ``dispatcher_in_flight{subscription=label}`` (one per label, so
        every claimer of this registry moves the same one)."""
        count = self._on_wire.get(label)
        if count is None:
            count = self._on_wire[label] = OnWire()
            self.in_flight.labels(subscription=label).set_function(count)
        return count
