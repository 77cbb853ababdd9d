"""Retry policy: bounds, cap, jitter spread, Retry-After parsing and clamping, give-up rules."""

from __future__ import annotations

import random
import statistics
from email.utils import formatdate

import pytest

from dispatcher import backoff, config

POLICY = config.RetryPolicy(
    base_seconds=2,
    cap_seconds=60,
    max_attempts=10,
    max_age_seconds=10_000,
    max_4xx_attempts=3,
    retry_after_max_seconds=300,
)


def test_delay_stays_within_exponential_ceiling_and_cap() -> None:
    rng = random.Random(1)
    for attempt in range(1, 40):
        ceiling = min(60, 2 * 2 ** (attempt - 1))
        for _ in range(200):
            d = backoff.full_jitter_delay(attempt, POLICY, rng.random)
            assert 0 <= d <= ceiling


def test_full_jitter_spreads_over_the_whole_range() -> None:
    rng = random.Random(2)
    samples = [backoff.full_jitter_delay(6, POLICY, rng.random) for _ in range(5000)]
    # attempt 6 → ceiling min(60, 64) = 60; uniform → mean ≈ 30, spread covers both ends.
    assert 27 < statistics.mean(samples) < 33
    assert min(samples) < 3
    assert max(samples) > 57


def test_extremes_of_the_random_source() -> None:
    assert backoff.full_jitter_delay(3, POLICY, lambda: 0.0) == 0.0
    assert backoff.full_jitter_delay(3, POLICY, lambda: 1.0) == 8.0
    assert backoff.full_jitter_delay(10_000, POLICY, lambda: 1.0) == 60.0


def test_gives_up_after_max_attempts() -> None:
    assert isinstance(backoff.decide(attempt=9, age_seconds=0, policy=POLICY), backoff.Retry)
    verdict = backoff.decide(attempt=10, age_seconds=0, policy=POLICY)
    assert isinstance(verdict, backoff.GiveUp)
    assert "10/10" in verdict.reason


def test_permanent_failures_get_fewer_attempts() -> None:
    assert isinstance(
        backoff.decide(attempt=2, age_seconds=0, policy=POLICY, permanent=True), backoff.Retry
    )
    assert isinstance(
        backoff.decide(attempt=3, age_seconds=0, policy=POLICY, permanent=True), backoff.GiveUp
    )


def test_gives_up_when_the_next_try_would_pass_max_age() -> None:
    verdict = backoff.decide(attempt=1, age_seconds=9_999, policy=POLICY, rand=lambda: 1.0)
    assert isinstance(verdict, backoff.GiveUp)
    assert "max age" in verdict.reason


def test_retry_after_replaces_jitter_and_is_clamped() -> None:
    assert backoff.decide(
        attempt=1, age_seconds=0, policy=POLICY, retry_after_seconds=42
    ) == backoff.Retry(42)
    assert backoff.decide(
        attempt=1, age_seconds=0, policy=POLICY, retry_after_seconds=10_000
    ) == backoff.Retry(300)
    assert backoff.decide(
        attempt=1, age_seconds=0, policy=POLICY, retry_after_seconds=-5
    ) == backoff.Retry(0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("-3", None),
        ("1.5", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert backoff.parse_retry_after(value, now=1000.0) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    assert backoff.parse_retry_after(formatdate(now + 90, usegmt=True), now=now) == 90.0
    assert backoff.parse_retry_after(formatdate(now - 90, usegmt=True), now=now) == 0.0


def test_default_schedule_spans_more_than_a_day() -> None:
    """Like Svix's and Stripe's: the default policy keeps trying for well over a day."""
    policy = config.RetryPolicy()
    spans = []
    for seed in range(200):
        rng = random.Random(seed)
        age, attempt = 0.0, 1
        while True:
            verdict = backoff.decide(
                attempt=attempt, age_seconds=age, policy=policy, rand=rng.random
            )
            if isinstance(verdict, backoff.GiveUp):
                break
            age += verdict.delay_seconds
            attempt += 1
        spans.append(age)
    assert min(spans) > 86_400, f"shortest schedule {min(spans) / 3600:.1f} h"
    assert max(spans) <= policy.max_age_seconds


def test_a_retry_landing_exactly_at_max_age_is_still_made() -> None:
    """The give-up point is strictly past max_age: age + delay == max_age retries."""
    exact = backoff.decide(attempt=1, age_seconds=9_998, policy=POLICY, retry_after_seconds=2)
    assert exact == backoff.Retry(2)
    past = backoff.decide(attempt=1, age_seconds=9_998.5, policy=POLICY, retry_after_seconds=2)
    assert past == backoff.GiveUp("max age exceeded (10000s)")
