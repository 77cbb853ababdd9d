"""Console sessions, CSRF tokens and the sign-in limiter, on an injected clock."""

from __future__ import annotations

from dispatcher.web.console import session


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_cookie_is_valid_until_it_expires_and_only_under_its_token() -> None:
    clock = Clock()
    sessions = session.Sessions("token-one-0123456789", lifetime_seconds=60, clock=clock)
    cookie, issued = sessions.issue()
    assert "token-one" not in cookie
    assert sessions.check(cookie) == issued
    assert session.Sessions("token-two-0123456789", clock=clock).check(cookie) is None
    clock.now += 59
    assert sessions.check(cookie) is not None
    clock.now += 2
    assert sessions.check(cookie) is None


def test_tampered_cookies_are_no_sessions() -> None:
    sessions = session.Sessions("token-one-0123456789")
    cookie, _ = sessions.issue()
    payload, _, mac = cookie.rpartition(".")
    sid, _, expiry = payload.partition(":")
    for forged in (
        "",
        "garbage",
        f"{payload}.",
        f"{payload}.{mac[::-1]}",
        f"other:{expiry}.{mac}",
        f"{sid}:{int(expiry) + 1}.{mac}",
        cookie + "x" * 300,
    ):
        assert sessions.check(forged) is None, forged


def test_revoked_sessions_stay_revoked_and_csrf_tokens_are_per_session() -> None:
    sessions = session.Sessions("token-one-0123456789")
    cookie, one = sessions.issue()
    _, two = sessions.issue()
    assert sessions.csrf_ok(one, sessions.csrf_token(one))
    assert not sessions.csrf_ok(one, sessions.csrf_token(two))
    assert not sessions.csrf_ok(one, None)
    assert not sessions.csrf_ok(one, "")
    sessions.revoke(one)
    assert sessions.check(cookie) is None


def test_the_token_comparison() -> None:
    sessions = session.Sessions("token-one-0123456789")
    assert sessions.token_matches("token-one-0123456789")
    assert not sessions.token_matches("token-one-012345678")
    assert not sessions.token_matches("")


def test_the_limiter_counts_failures_per_client_within_the_window() -> None:
    clock = Clock()
    limiter = session.SignInLimiter(failures=3, window_seconds=60, clock=clock)
    for _ in range(3):
        assert limiter.retry_after_seconds("a") == 0
        limiter.failed("a")
        clock.now += 1
    assert limiter.retry_after_seconds("a") == 57  # the first failure leaves the window then
    assert limiter.retry_after_seconds("b") == 0
    clock.now += 57
    assert limiter.retry_after_seconds("a") == 0
    limiter.failed("a")
    limiter.succeeded("a")
    assert limiter.retry_after_seconds("a") == 0
