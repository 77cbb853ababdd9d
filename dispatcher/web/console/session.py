"""Console sign-in state: signed, expiring session cookies, CSRF tokens and the sign-in rate
limit.

The session cookie is ``<payload>.<mac>``: the payload (session id and expiry) is readable,
the HMAC-SHA256 over it is keyed by a key derived from the admin token, so replacing the token
ends every session, and replicas sharing a token accept each other's cookies. Signing out
removes the cookie and remembers the session id as revoked in this process until it would
have expired anyway. CSRF tokens are an HMAC of the session id under the same key: a form
posted without the token of the session that rendered it is refused.

Pure state and arithmetic: no HTTP handling, no database, and never a token or a cookie value
in a log line.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Final

SESSION_COOKIE: Final = "dispatcher_console"
# The sign-in form's double-submit cookie: a cross-site page cannot read or set it.
SIGN_IN_COOKIE: Final = "dispatcher_console_signin"
SESSION_SECONDS: Final = 8 * 3600
SIGN_IN_FAILURES_PER_WINDOW: Final = 5
SIGN_IN_WINDOW_SECONDS: Final = 60.0
# Remembered clients (rate limit) and revoked sessions are bounded: past this the oldest go.
MAX_TRACKED: Final = 10_000


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    expires_at: float


class Sessions:
    """Issues and checks session cookies and CSRF tokens for one admin token."""

    def __init__(
        self,
        admin_token: str,
        *,
        lifetime_seconds: float = SESSION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # A key of its own, not the token itself: a leaked cookie MAC says nothing usable
        # about the token, and the bearer token is never an HMAC key elsewhere.
        self._key = hashlib.sha256(
            b"dispatcher-console-session\x00" + admin_token.encode()
        ).digest()
        self._lifetime = lifetime_seconds
        self._clock = clock
        self._revoked: dict[str, float] = {}

    def _mac(self, purpose: bytes, data: bytes) -> str:
        return _b64(hmac.new(self._key, purpose + b"\x00" + data, hashlib.sha256).digest())

    def issue(self) -> tuple[str, Session]:
        """A new session → (cookie value, session)."""
        session = Session(secrets.token_urlsafe(18), self._clock() + self._lifetime)
        payload = f"{session.session_id}:{int(session.expires_at)}"
        return f"{payload}.{self._mac(b'session', payload.encode())}", session

    def check(self, cookie: str | None) -> Session | None:
        """The session a cookie stands for, or None when it is absent, forged, expired or
        signed out."""
        if not cookie or len(cookie) > 200:
            return None
        payload, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(b"session", payload.encode()).encode()):
            return None
        session_id, _, expiry = payload.partition(":")
        if not expiry.isdigit() or int(expiry) <= self._clock():
            return None
        if session_id in self._revoked:
            return None
        return Session(session_id, float(expiry))

    def revoke(self, session: Session) -> None:
        now = self._clock()
        for sid, until in list(self._revoked.items()):
            if until <= now:
                del self._revoked[sid]
        if len(self._revoked) >= MAX_TRACKED:
            self._revoked.pop(next(iter(self._revoked)))
        self._revoked[session.session_id] = session.expires_at

    def csrf_token(self, session: Session) -> str:
        return self._mac(b"csrf", session.session_id.encode())

    def csrf_ok(self, session: Session, supplied: str | None) -> bool:
        return supplied is not None and hmac.compare_digest(
            supplied.encode(), self.csrf_token(session).encode()
        )

    @staticmethod
    def sign_in_nonce() -> str:
        return secrets.token_urlsafe(18)

    def token_matches(self, supplied: str) -> bool:
        """Constant-time comparison with the admin token, through the derived key."""
        candidate = hashlib.sha256(b"dispatcher-console-session\x00" + supplied.encode()).digest()
        return hmac.compare_digest(candidate, self._key)


class SignInLimiter:
    """At most ``failures`` failed sign-ins per client per ``window_seconds``; a success
    clears the client's count. In-process: each replica limits on its own."""

    def __init__(
        self,
        *,
        failures: int = SIGN_IN_FAILURES_PER_WINDOW,
        window_seconds: float = SIGN_IN_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._failures = failures
        self._window = window_seconds
        self._clock = clock
        self._seen: dict[str, list[float]] = {}

    def retry_after_seconds(self, client: str) -> float:
        """0 when the client may try now, else how long until it may."""
        now = self._clock()
        recent = [t for t in self._seen.get(client, ()) if t > now - self._window]
        if recent:
            self._seen[client] = recent
        else:
            self._seen.pop(client, None)
        if len(recent) < self._failures:
            return 0.0
        return max(0.0, recent[0] + self._window - now)

    def failed(self, client: str) -> None:
        if client not in self._seen and len(self._seen) >= MAX_TRACKED:
            self._seen.pop(next(iter(self._seen)))
        self._seen.setdefault(client, []).append(self._clock())

    def succeeded(self, client: str) -> None:
        self._seen.pop(client, None)
