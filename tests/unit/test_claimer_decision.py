"""The claimer's verdict → delivery state table (``claimer.decide``), without a loop, a
database or a clock: the same inputs give the same decision."""

from __future__ import annotations

import pytest

from dispatcher import claimer, config, model

POLICY = config.RetryPolicy(
    base_seconds=10.0,
    cap_seconds=100.0,
    max_attempts=5,
    max_age_seconds=1000.0,
    max_4xx_attempts=2,
    retry_after_max_seconds=60.0,
)
State = model.DeliveryState
V = model.Verdict


def _result(
    verdict: model.Verdict, *, error: str | None = "HTTP 500", retry_after: float | None = None
) -> model.AttemptResult:
    return model.AttemptResult(
        verdict=verdict,
        outcome=model.Outcome.OTHER,
        status=None,
        error=None if verdict is V.DELIVERED else error,
        duration_seconds=0.01,
        retry_after_seconds=retry_after,
    )


@pytest.mark.parametrize(
    ("verdict", "attempt", "age_seconds", "retry_after", "expected"),
    [
        # Terminal verdicts ignore attempt, age and policy.
        (V.DELIVERED, 1, 0.0, None, (State.DELIVERED, None, None)),
        (V.DELIVERED, 99, 1e9, None, (State.DELIVERED, None, None)),
        (V.GONE, 1, 0.0, None, (State.PARKED, None, "HTTP 500")),
        (V.BLOCKED, 1, 0.0, None, (State.DEAD, None, "HTTP 500")),
        # Retryable: full jitter with rand() = 0.5 → half of base * 2^(attempt-1).
        (V.RETRYABLE, 1, 0.0, None, (State.RETRYING, 5.0, "HTTP 500")),
        (V.RETRYABLE, 3, 0.0, None, (State.RETRYING, 20.0, "HTTP 500")),
        (V.RETRYABLE, 4, 0.0, 30.0, (State.RETRYING, 30.0, "HTTP 500")),  # Retry-After wins
        (V.RETRYABLE, 4, 0.0, 600.0, (State.RETRYING, 60.0, "HTTP 500")),  # ... clamped
        (V.RETRYABLE, 5, 0.0, None, (State.DEAD, None, "HTTP 500 (attempts exhausted (5/5))")),
        (V.RETRYABLE, 1, 999.0, None, (State.DEAD, None, "HTTP 500 (max age exceeded (1000s))")),
        # Permanent failures (most 4xx) get max_4xx_attempts tries.
        (V.PERMANENT, 1, 0.0, None, (State.RETRYING, 5.0, "HTTP 500")),
        (V.PERMANENT, 2, 0.0, None, (State.DEAD, None, "HTTP 500 (attempts exhausted (2/2))")),
    ],
)
def test_verdict_to_state(
    verdict: model.Verdict,
    attempt: int,
    age_seconds: float,
    retry_after: float | None,
    expected: tuple[model.DeliveryState, float | None, str | None],
) -> None:
    got = claimer.decide(
        _result(verdict, retry_after=retry_after),
        attempt=attempt,
        age_seconds=age_seconds,
        policy=POLICY,
        rand=lambda: 0.5,
    )
    assert got == expected
    # The state is the string the database stores.
    assert got[0] in {"delivered", "retrying", "dead", "parked"}
