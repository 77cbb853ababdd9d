"""Retry policy: attempt number (and an optional Retry-After) → the next delay, or give up.

Pure: the clock and the random source are passed in, so tests shrink or pin schedules by
configuration instead of patching time. Nothing here knows about HTTP or the database.
"""

from __future__ import annotations

import dataclasses
import email.utils
import random
from collections.abc import Callable

from dispatcher import config


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """Try again after ``delay_seconds``."""

    delay_seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class GiveUp:
    """No more attempts; ``reason`` says which limit ended it."""

    reason: str


Decision = Retry | GiveUp


def full_jitter_delay(attempt: int, policy: config.RetryPolicy, rand: Callable[[], float]) -> float:
    """AWS-style full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    exponent = min(max(attempt - 1, 0), 62)  # beyond 2**62 the cap has long taken over
    ceiling = min(policy.cap_seconds, policy.base_seconds * float(2**exponent))
    return rand() * ceiling


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now`` (delta-seconds or HTTP date); None if unparseable."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def decide(
    *,
    attempt: int,
    age_seconds: float,
    policy: config.RetryPolicy,
    permanent: bool = False,
    retry_after_seconds: float | None = None,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """What to do after failed attempt number ``attempt`` (1-based).

    ``permanent`` failures (most 4xx) get ``max_4xx_attempts`` tries instead of
    ``max_attempts``. ``Retry-After`` replaces the jittered delay, clamped to
    ``retry_after_max_seconds``; a delay that would land past ``max_age_seconds`` gives up."""
    limit = policy.max_4xx_attempts if permanent else policy.max_attempts
    if attempt >= limit:
        return GiveUp(f"attempts exhausted ({attempt}/{limit})")
    if retry_after_seconds is not None:
        delay = min(max(retry_after_seconds, 0.0), policy.retry_after_max_seconds)
    else:
        delay = full_jitter_delay(attempt, policy, rand)
    if age_seconds + delay > policy.max_age_seconds:
        return GiveUp(f"max age exceeded ({policy.max_age_seconds:.0f}s)")
    return Retry(delay)
