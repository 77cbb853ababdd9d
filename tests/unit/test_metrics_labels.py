"""Label folding: at most ``max_subscriptions`` subscription label values, the rest ``other``;
folded gauges add up counts, keep the largest oldest-age and the smallest ``up``."""

from __future__ import annotations

import prometheus_client as prom

from dispatcher import gauges, metrics
from dispatcher.db import gauges as db_gauges


def test_first_subscriptions_keep_their_label_and_the_rest_fold() -> None:
    label = metrics.SubscriptionLabels(2)
    got = [label(s) for s in ("a", "b", "c", "a", "d", "b")]
    assert got == ["a", "b", "other", "a", "other", "b"]


def test_zero_limit_folds_everything() -> None:
    label = metrics.SubscriptionLabels(0)
    assert {label(s) for s in "abc"} == {"other"}


def test_counters_fold_through_the_metrics_label() -> None:
    registry = prom.CollectorRegistry()
    m = metrics.Metrics(registry, max_subscriptions=1)
    for sub in ("a", "b", "c"):
        m.attempts.labels(subscription=m.label(sub), outcome="success").inc()
    get = registry.get_sample_value
    assert get("dispatcher_attempts_total", {"subscription": "a", "outcome": "success"}) == 1
    assert get("dispatcher_attempts_total", {"subscription": "other", "outcome": "success"}) == 2


def test_in_flight_reads_the_count_the_claimer_moves_at_scrape_time() -> None:
    registry = prom.CollectorRegistry()
    m = metrics.Metrics(registry, max_subscriptions=1)
    on_wire = m.on_wire(m.label("a"))
    assert m.on_wire("a") is on_wire  # one count per label, whoever asks
    on_wire.n += 3
    m.on_wire(m.label("b")).n += 1
    get = registry.get_sample_value
    assert get("dispatcher_in_flight", {"subscription": "a"}) == 3
    assert get("dispatcher_in_flight", {"subscription": "other"}) == 1
    on_wire.n -= 3
    assert get("dispatcher_in_flight", {"subscription": "a"}) == 0


def _snapshot() -> db_gauges.Snapshot:
    subs = (
        db_gauges.Subscription("a", enabled=True, oldest_age_seconds=5.0),
        db_gauges.Subscription("b", enabled=True, oldest_age_seconds=30.0),
        db_gauges.Subscription("c", enabled=False, oldest_age_seconds=None),
        db_gauges.Subscription("d", enabled=True, oldest_age_seconds=12.0),
    )
    depth = {
        ("a", "pending"): 1,
        ("b", "pending"): 2,
        ("b", "dead"): 7,
        ("c", "parked"): 4,  # not a reported state
        ("d", "pending"): 3,
        ("d", "retrying"): 1,
        ("gone", "pending"): 9,  # deleted between the two reads
    }
    return db_gauges.Snapshot(subs, depth, outbox_backlog=0)


def test_fold_sums_counts_maxes_age_and_mins_up() -> None:
    folded = gauges.fold(_snapshot(), metrics.SubscriptionLabels(1))
    assert folded.depth == {
        ("a", "pending"): 1,
        ("a", "in_flight"): 0,
        ("a", "retrying"): 0,
        ("a", "dead"): 0,
        ("other", "pending"): 5,
        ("other", "in_flight"): 0,
        ("other", "retrying"): 1,
        ("other", "dead"): 7,
    }
    assert folded.oldest_age_seconds == {"a": 5.0, "other": 30.0}
    assert folded.up == {"a": 1, "other": 0}


def test_fold_without_a_limit_keeps_every_subscription() -> None:
    folded = gauges.fold(_snapshot(), metrics.SubscriptionLabels(100))
    assert set(folded.up) == {"a", "b", "c", "d"}
    assert folded.oldest_age_seconds["c"] == 0.0
    assert folded.depth[("c", "pending")] == 0


def test_publish_removes_series_that_disappeared() -> None:
    registry = prom.CollectorRegistry()
    m = metrics.Metrics(registry, max_subscriptions=10)
    loop = gauges.GaugeLoop(None, m, interval_seconds=1)
    loop.publish(gauges.fold(_snapshot(), m.label))
    get = registry.get_sample_value
    assert get("dispatcher_queue_depth", {"subscription": "b", "state": "dead"}) == 7
    smaller = db_gauges.Snapshot(_snapshot().subscriptions[:1], {}, outbox_backlog=0)
    loop.publish(gauges.fold(smaller, m.label))
    assert get("dispatcher_queue_depth", {"subscription": "b", "state": "dead"}) is None
    assert get("dispatcher_subscription_up", {"subscription": "b"}) is None
    assert get("dispatcher_queue_depth", {"subscription": "a", "state": "pending"}) == 0


def test_compaction_waits_for_enough_delta_rows() -> None:
    groups = {(str(i), "pending"): 1 for i in range(10)}
    assert not gauges.needs_compaction(db_gauges.Snapshot((), groups, 0, delta_rows=20))
    assert gauges.needs_compaction(
        db_gauges.Snapshot((), groups, 0, delta_rows=20 + gauges.COMPACT_SLACK_ROWS + 1)
    )
