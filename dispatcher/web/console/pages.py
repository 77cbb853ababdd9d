"""The operator console: server-rendered pages under ``/ui/`` on the admin listener.

Same authority as ``/v1``: the admin token, entered once on the sign-in page, buys a signed
session cookie (``session``). Every read and write goes through ``dispatcher.db.management``
after ``dispatcher.validation`` (and ``admin_api``'s path ids), as for ``/v1`` and the CLI, so
the console can do nothing the API cannot and rejects what the API rejects. Pages work
without JavaScript; htmx (vendored under ``static/``) only refreshes the overview and the
replay progress in place.

Every response carries a Content-Security-Policy without inline scripts or styles and with
``frame-ancestors 'none'``; templates autoescape every value. This module must not hold SQL,
render a secret or a signature (the one exception: a rotated secret, shown once in the
response to the rotation), or log tokens, cookies or bodies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import re
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp_jinja2
import jinja2
import orjson
import structlog
from aiohttp import web

from dispatcher import sender, signing, validation
from dispatcher.db import management
from dispatcher.web import admin_api
from dispatcher.web.console import session as console_session

log = structlog.get_logger("dispatcher.console")

PREFIX: Final = "/ui"
PACKAGE_DIR: Final = Path(__file__).resolve().parent
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer Chromium posts forms with Origin: null.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
PAGE_SIZE: Final = 50
DETAIL_LIST_SIZE: Final = 20
REDACTED: Final = "[redacted]"
# Custom header names whose values are credentials more often than not: shown as redacted.
_CREDENTIAL_HEADER = re.compile(r"auth|token|secret|key|cookie|passw|signature|session", re.I)
# What an HTML datetime-local input sends; the console reads it as UTC.
_LOCAL_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")
# Fixed notices a redirect may ask for (never text taken from the query string).
NOTICES: Final = {
    "enabled": "Subscription enabled.",
    "disabled": "Subscription disabled.",
    "retried": "Delivery queued for another attempt now.",
    "cancelled": "Delivery cancelled.",
    "test_sent": "Test event published.",
    "signed_out": "Signed out.",
}
MAX_REPLAY_JOBS: Final = 100

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass(slots=True)
class ReplayJob:
    """A bulk replay of dead deliveries running in this process."""

    job_id: str
    subscription_id: str
    since: str
    done: int = 0
    total: int | None = None
    finished: bool = False
    error: str | None = None
    task: asyncio.Task[None] | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(slots=True)
class Console:
    """What the console's handlers share (one per admin listener)."""

    mgmt: management.Management
    sessions: console_session.Sessions | None
    limiter: console_session.SignInLimiter
    signers: signing.SignerRegistry
    replays: dict[str, ReplayJob] = dataclasses.field(default_factory=dict)


CONSOLE: web.AppKey[Console] = web.AppKey("console", Console)
JINJA: web.AppKey[jinja2.Environment] = web.AppKey("console_templates", jinja2.Environment)


def _session(request: web.Request) -> console_session.Session | None:
    """The request's session (checked again where needed: an HMAC, cheaper than keeping
    per-request state)."""
    sessions = request.app[CONSOLE].sessions
    if sessions is None:
        return None
    return sessions.check(request.cookies.get(console_session.SESSION_COOKIE))


# -- rendering ----------------------------------------------------------------------------------


def _render(
    request: web.Request, name: str, context: Mapping[str, Any], *, status: int = 200
) -> web.Response:
    session = _session(request)
    console = request.app[CONSOLE]
    base = {
        "prefix": PREFIX,
        "signed_in": session is not None,
        "csrf": console.sessions.csrf_token(session) if console.sessions and session else "",
        "notice": NOTICES.get(request.query.get("done", "")),
        "path": request.path,
    }
    return aiohttp_jinja2.render_template(
        name, request, {**base, **context}, status=status, app_key=JINJA
    )


def _pretty_json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def _when(value: str | None) -> str:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM:SS UTC`` (the full value stays in a title)."""
    if not value:
        return "—"
    at = datetime.datetime.fromisoformat(value).astimezone(datetime.UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: str | None) -> str:
    if not value:
        return "—"
    seconds = (
        datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(value)
    ).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _setup_templates(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        app,
        app_key=JINJA,
        loader=jinja2.PackageLoader("dispatcher.web.console", "templates"),
        # Every value escaped, whatever the template's file name.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        default_helpers=False,
    )
    env.filters.update(pretty_json=_pretty_json, when=_when, ago=_ago, ratio=_ratio)


# -- health and headers shown on pages -----------------------------------------------------------


def health_of(sub: Mapping[str, Any]) -> tuple[str, str]:
    """(state, why) of a subscription as the console shows it."""
    if not sub["enabled"]:
        return "disabled", sub.get("disabled_reason") or ""
    if sub.get("paused_until"):
        return "paused", f"until {_when(sub['paused_until'])}: {sub.get('paused_reason') or ''}"
    if sub.get("failing_since"):
        return "failing", f"failing since {_when(sub['failing_since'])}"
    return "up", ""


def shown_custom_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: REDACTED if _CREDENTIAL_HEADER.search(k) else v for k, v in headers.items()}


def request_headers(
    signers: signing.SignerRegistry, sub: Mapping[str, Any], event_id: str, timestamp: int
) -> dict[str, str]:
    """The headers an attempt at ``timestamp`` carried, signatures redacted. A header is a
    signature when its value changes with the secret: signing twice with two throwaway
    secrets tells them apart for any signer, built-in or plugged in."""
    out = shown_custom_headers(sender.unsigned_headers(sub["headers"]))
    try:
        chosen = signers.for_subscription(sub["signature_header"], tuple(sub["signers"]))
    except signing.SigningError:
        return out
    signed = [
        signing.sign(
            chosen,
            signing.SigningInput(
                msg_id=event_id,
                timestamp=timestamp,
                body=b"{}",
                secrets=(signing.generate_secret(),),
                header_name=sub["signature_header"],
            ),
        )
        for _ in range(2)
    ]
    for name, value in signed[0].items():
        out[name] = value if signed[1].get(name) == value else REDACTED
    return out


# -- middlewares ---------------------------------------------------------------------------------


def _error_page(request: web.Request, status: int, title: str, detail: str) -> web.Response:
    return _render(request, "error.html", {"title": title, "detail": detail}, status=status)


@web.middleware
async def _frame(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers and server time on every response; failures as HTML pages."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except validation.ValidationError as exc:
        where = f"{exc.field}: " if exc.field else ""
        response = _error_page(request, 400, "Not accepted", f"{where}{exc.detail}")
    except management.NotFound as exc:
        response = _error_page(request, 404, "Not found", exc.detail)
    except management.Conflict as exc:
        response = _error_page(request, 409, "Not possible now", exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect: sent as it is, with the same headers
            exc.headers.update(SECURITY_HEADERS)
            raise
        response = _error_page(request, exc.status, exc.reason or "Error", exc.reason or "")
    except Exception:
        # Logged with its traceback; the page says only that it failed.
        log.exception("console_request_failed", method=request.method, path=request.path)
        response = _error_page(request, 500, "Error", "the server failed to handle the request")
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith(f"{PREFIX}/static/"):
        response.headers["Cache-Control"] = "no-store"
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
    return response


_PUBLIC_PATHS: Final = frozenset({f"{PREFIX}/sign-in"})


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    console = request.app[CONSOLE]
    if request.path == PREFIX:
        raise web.HTTPFound(f"{PREFIX}/")
    if request.path.startswith(f"{PREFIX}/static/"):
        return await handler(request)
    if console.sessions is None:
        return _render(request, "disabled.html", {}, status=503)
    if request.method not in ("GET", "HEAD") and not _same_origin(request):
        return _error_page(request, 403, "Refused", "cross-site form posts are refused")
    if request.path in _PUBLIC_PATHS:
        return await handler(request)
    session = _session(request)
    if session is None:
        if request.headers.get("HX-Request"):
            # htmx follows this instead of swapping the sign-in page into a fragment.
            return web.Response(status=401, headers={"HX-Redirect": f"{PREFIX}/sign-in"})
        if request.method in ("GET", "HEAD"):
            target = request.path_qs if request.path != f"{PREFIX}/" else ""
            query = f"?{urllib.parse.urlencode({'next': target})}" if target else ""
            raise web.HTTPSeeOther(f"{PREFIX}/sign-in{query}")
        return _error_page(request, 401, "Sign in first", "your session has ended")
    if request.method not in ("GET", "HEAD"):
        form = await request.post()
        supplied = form.get("csrf")
        if not console.sessions.csrf_ok(session, supplied if isinstance(supplied, str) else None):
            return _error_page(
                request, 403, "Refused", "the form is stale or forged: reload the page and retry"
            )
    return await handler(request)


def _same_origin(request: web.Request) -> bool:
    """Defence in depth before the CSRF token: browsers say where a form post comes from in
    Sec-Fetch-Site (a page cannot forge it); older ones only in Origin, whose host must then
    be this listener's (or, behind a proxy, the one it forwarded for). The scheme is not
    compared: a TLS-terminating proxy makes https pages post to an http listener."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin in (None, "null"):
        return True
    host = urllib.parse.urlsplit(origin).netloc
    return host in (request.host, request.headers.get("X-Forwarded-Host"))


def _over_https(request: web.Request) -> bool:
    """HTTPS here or at a proxy in front. Trusting the header is safe in this one use: it can
    only add the Secure flag, and a client that fakes it merely loses its own cookie."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def _safe_next(value: str | None) -> str:
    """Only console paths (never another host) are followed after sign-in."""
    if value and value.startswith(f"{PREFIX}/") and not value.startswith(f"{PREFIX}//"):
        return value
    return f"{PREFIX}/"


def _set_cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=f"{PREFIX}/",
        httponly=True,
        samesite="Strict",
        secure=_over_https(request),
    )


# -- sign in and out -----------------------------------------------------------------------------


async def sign_in_form(request: web.Request) -> web.Response:
    return _sign_in_page(request, error=None, status=200)


def _sign_in_page(request: web.Request, *, error: str | None, status: int) -> web.Response:
    nonce = console_session.Sessions.sign_in_nonce()
    response = _render(
        request,
        "sign_in.html",
        {"error": error, "nonce": nonce, "next": _safe_next(request.query.get("next"))},
        status=status,
    )
    _set_cookie(request, response, console_session.SIGN_IN_COOKIE, nonce, 600)
    return response


async def sign_in(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    assert console.sessions is not None  # _auth answers 503 without a token
    client = request.remote or "unknown"
    wait_seconds = console.limiter.retry_after_seconds(client)
    if wait_seconds > 0:
        log.warning("console_sign_in_limited", client=client)
        response = _sign_in_page(
            request, error="Too many failed sign-ins: wait a minute and retry.", status=429
        )
        response.headers["Retry-After"] = str(int(wait_seconds) + 1)
        return response
    form = await request.post()
    nonce = form.get("nonce")
    if not isinstance(nonce, str) or nonce != request.cookies.get(console_session.SIGN_IN_COOKIE):
        return _sign_in_page(request, error="The form expired: sign in again.", status=400)
    token = form.get("token")
    if not isinstance(token, str) or not console.sessions.token_matches(token):
        console.limiter.failed(client)
        log.warning("console_sign_in_failed", client=client)
        return _sign_in_page(request, error="That is not the admin token.", status=401)
    console.limiter.succeeded(client)
    cookie, session = console.sessions.issue()
    next_path = form.get("next")
    response = web.HTTPSeeOther(_safe_next(next_path if isinstance(next_path, str) else None))
    _set_cookie(
        request,
        response,
        console_session.SESSION_COOKIE,
        cookie,
        int(session.expires_at - time.time()),
    )
    response.del_cookie(console_session.SIGN_IN_COOKIE, path=f"{PREFIX}/")
    log.info("console_signed_in", client=client)
    raise response


async def sign_out(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    assert console.sessions is not None
    session = _session(request)
    assert session is not None  # _auth let the request through
    console.sessions.revoke(session)
    response = web.HTTPSeeOther(f"{PREFIX}/sign-in?done=signed_out")
    response.del_cookie(console_session.SESSION_COOKIE, path=f"{PREFIX}/")
    log.info("console_signed_out", client=request.remote or "unknown")
    raise response


# -- overview ------------------------------------------------------------------------------------


async def overview(request: web.Request) -> web.Response:
    stats = await request.app[CONSOLE].mgmt.overview()
    return _render(request, "overview.html", {"stats": stats, "title": "Overview"})


async def overview_stats(request: web.Request) -> web.Response:
    stats = await request.app[CONSOLE].mgmt.overview()
    return _render(request, "_overview_stats.html", {"stats": stats})


# -- subscriptions -------------------------------------------------------------------------------


async def subscriptions(request: web.Request) -> web.Response:
    mgmt = request.app[CONSOLE].mgmt
    q = request.query
    search = validation.validate_search(q)
    page = await mgmt.list_subscriptions(
        limit=PAGE_SIZE, after=validation.subscription_cursor(q), search=search
    )
    stats = await mgmt.subscription_stats([uuid.UUID(s["id"]) for s in page.items])
    rows = [{**s, "health": health_of(s), "stats": stats[s["id"]]} for s in page.items]
    cursor = validation.encode_cursor("subscriptions", page.next_key)
    next_url = None
    if cursor is not None:
        next_url = f"{PREFIX}/subscriptions?" + urllib.parse.urlencode(
            {**({"search": search} if search else {}), "cursor": cursor}
        )
    return _render(
        request,
        "subscriptions.html",
        {
            "title": "Subscriptions",
            "rows": rows,
            "search": search or "",
            "next_url": next_url,
            "window": management.RECENT_MINUTES,
        },
    )


async def subscription(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    sid = admin_api.subscription_id(request.match_info["subscription_id"])
    sub = await console.mgmt.get_subscription(sid)
    events = await console.mgmt.list_subscription_events(sid, limit=DETAIL_LIST_SIZE)
    recent = await console.mgmt.list_deliveries(
        management.DeliveryFilter(subscription_id=sid), limit=DETAIL_LIST_SIZE
    )
    stats = (await console.mgmt.subscription_stats([sid]))[str(sid)]
    return _render(
        request,
        "subscription.html",
        {
            "title": f"Subscription {sid}",
            "sub": sub,
            "health": health_of(sub),
            "stats": stats,
            "custom_headers": shown_custom_headers(sub["headers"]),
            "events": events.items,
            "deliveries": recent.items,
            "next_url": None,
            "window": management.RECENT_MINUTES,
            "grace_seconds": validation.DEFAULT_GRACE_SECONDS,
        },
    )


async def _form(request: web.Request) -> Mapping[str, str]:
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _back_to_subscription(sid: uuid.UUID, done: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"{PREFIX}/subscriptions/{sid}?done={done}")


async def enable_subscription(request: web.Request) -> web.StreamResponse:
    sid = admin_api.subscription_id(request.match_info["subscription_id"])
    await request.app[CONSOLE].mgmt.enable_subscription(sid)
    log.info("subscription_enabled", subscription=str(sid), via="console")
    raise _back_to_subscription(sid, "enabled")


async def disable_subscription(request: web.Request) -> web.StreamResponse:
    sid = admin_api.subscription_id(request.match_info["subscription_id"])
    form = await _form(request)
    reason_text = form.get("reason", "").strip()
    reason = validation.validate_disable({"reason": reason_text} if reason_text else {})
    await request.app[CONSOLE].mgmt.disable_subscription(sid, reason)
    log.info("subscription_disabled", subscription=str(sid), reason=reason, via="console")
    raise _back_to_subscription(sid, "disabled")


def _form_int(form: Mapping[str, str], field: str) -> int | str:
    """A form number for a validator: an int when it reads as one, else the text (which the
    validator then rejects with its usual message)."""
    raw = form.get(field, "").strip()
    return int(raw) if re.fullmatch(r"-?[0-9]{1,12}", raw) else raw


async def rotate_secret(request: web.Request) -> web.Response:
    sid = admin_api.subscription_id(request.match_info["subscription_id"])
    form = await _form(request)
    secret, grace = validation.validate_rotation(
        {"grace_period_seconds": _form_int(form, "grace_period_seconds")}
    )
    result = await request.app[CONSOLE].mgmt.rotate_secret(sid, secret, grace)
    log.info(
        "subscription_secret_rotated", subscription=str(sid), grace_seconds=grace, via="console"
    )
    return _render(
        request,
        "secret_once.html",
        {"title": "New signing secret", "sub": result, "secret": result["secret"], "grace": grace},
    )


async def send_test(request: web.Request) -> web.StreamResponse:
    sid = admin_api.subscription_id(request.match_info["subscription_id"])
    form = await _form(request)
    raw = form.get("payload", "").strip()
    body: dict[str, Any] = {}
    if raw:
        try:
            body["payload"] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise validation.invalid("payload", "is not valid JSON", "invalid_json") from None
    payload = validation.validate_test_event(body)
    result = await request.app[CONSOLE].mgmt.send_test_event(sid, payload)
    raise web.HTTPSeeOther(
        f"{PREFIX}/events?"
        + urllib.parse.urlencode({"event_id": result["event_id"], "done": "test_sent"})
    )


# -- deliveries ----------------------------------------------------------------------------------


def _form_time(value: str) -> str:
    """A datetime-local value (no zone) read as UTC, in the RFC 3339 form the validators
    take; anything else is passed on for them to judge."""
    value = value.strip()
    if _LOCAL_TIME.fullmatch(value):
        return value + ("Z" if value.count(":") == 2 else ":00Z")
    return value


DELIVERY_FILTERS: Final = (
    "state",
    "subscription_id",
    "event_type",
    "created_after",
    "created_before",
)


def _delivery_query(query: Mapping[str, str]) -> dict[str, str]:
    """The filter fields the form filled in, times as RFC 3339."""
    out = {}
    for name in DELIVERY_FILTERS:
        value = query.get(name, "").strip()
        if value:
            out[name] = _form_time(value) if name.startswith("created_") else value
    return out


async def _delivery_page(
    request: web.Request, chosen: Mapping[str, str], *, path: str
) -> dict[str, Any]:
    filters = management.DeliveryFilter(**validation.validate_delivery_filter(chosen))
    page = await request.app[CONSOLE].mgmt.list_deliveries(
        filters, limit=PAGE_SIZE, before_id=validation.id_cursor(request.query, "deliveries")
    )
    cursor = validation.encode_cursor("deliveries", page.next_key)
    next_url = None
    if cursor is not None:
        shown = {k: request.query[k] for k in DELIVERY_FILTERS if request.query.get(k)}
        next_url = f"{path}?" + urllib.parse.urlencode({**shown, "cursor": cursor})
    return {"deliveries": page.items, "next_url": next_url}


async def deliveries(request: web.Request) -> web.Response:
    listing = await _delivery_page(
        request, _delivery_query(request.query), path=f"{PREFIX}/deliveries"
    )
    return _render(
        request,
        "deliveries.html",
        {
            "title": "Deliveries",
            **listing,
            "states": validation.DELIVERY_STATES,
            "form": {k: request.query.get(k, "") for k in DELIVERY_FILTERS},
        },
    )


async def delivery_detail(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    did = admin_api.delivery_id(request.match_info["delivery_id"])
    found = await console.mgmt.get_delivery(did)
    sub = await console.mgmt.get_subscription(uuid.UUID(found["subscription_id"]))
    attempts = [
        {
            **a,
            "headers": request_headers(
                console.signers,
                sub,
                found["event_id"],
                int(datetime.datetime.fromisoformat(a["started_at"]).timestamp()),
            ),
        }
        for a in found["attempt_log"]
    ]
    return _render(
        request,
        "delivery.html",
        {
            "title": f"Delivery {did}",
            "d": found,
            "sub": sub,
            "attempts": attempts,
            "retryable": found["state"] in management.RETRYABLE_STATES,
            "cancellable": found["state"] in management.CANCELLABLE_STATES,
        },
    )


async def retry_delivery(request: web.Request) -> web.StreamResponse:
    did = admin_api.delivery_id(request.match_info["delivery_id"])
    await request.app[CONSOLE].mgmt.retry_delivery(did)
    log.info("delivery_retry_requested", delivery_id=did, via="console")
    raise web.HTTPSeeOther(f"{PREFIX}/deliveries/{did}?done=retried")


async def cancel_delivery(request: web.Request) -> web.StreamResponse:
    did = admin_api.delivery_id(request.match_info["delivery_id"])
    await request.app[CONSOLE].mgmt.cancel_delivery(did)
    log.info("delivery_cancelled", delivery_id=did, via="console")
    raise web.HTTPSeeOther(f"{PREFIX}/deliveries/{did}?done=cancelled")


# -- dead letters --------------------------------------------------------------------------------


async def dead_letters(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    chosen = {"state": "dead"}
    sub_filter = request.query.get("subscription_id", "").strip()
    if sub_filter:
        chosen["subscription_id"] = sub_filter
    listing = await _delivery_page(request, chosen, path=f"{PREFIX}/dead-letters")
    subs = await console.mgmt.list_subscriptions(limit=validation.PAGE_LIMIT_RANGE[1])
    return _render(
        request,
        "dead_letters.html",
        {
            "title": "Dead letters",
            **listing,
            "subscriptions": subs.items,
            "chosen_subscription": sub_filter,
            "replays": sorted(console.replays.values(), key=lambda j: j.job_id),
        },
    )


async def start_replay(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await _form(request)
    sid = validation.parse_uuid(form.get("subscription_id", "").strip(), "subscription_id")
    since = validation.validate_retry_dead({"since": _form_time(form.get("since", ""))})
    # Refused now (unknown or disabled subscription) rather than in the background.
    found = await console.mgmt.get_subscription(sid)
    if not found["enabled"]:
        raise management.Conflict(
            f"subscription {sid} is disabled; enable it first", code="subscription_disabled"
        )
    if len(console.replays) >= MAX_REPLAY_JOBS:
        for old in [j for j in console.replays.values() if j.finished]:
            del console.replays[old.job_id]
    job = ReplayJob(secrets.token_urlsafe(9), str(sid), since.isoformat())

    def progress(done: int, total: int) -> None:
        job.done, job.total = done, total

    async def run() -> None:
        try:
            result = await console.mgmt.retry_dead(sid, since, on_progress=progress)
            job.done = result["retried"]
            job.total = job.total if job.total is not None else job.done
            log.info("deliveries_replayed", subscription=str(sid), retried=job.done, via="console")
        except management.ManagementError as exc:
            job.error = exc.detail
        except Exception as exc:
            # The job records the failure for its page; the process carries on.
            job.error = "the replay failed; see the dispatcher log"
            log.error("console_replay_failed", subscription=str(sid), error=type(exc).__name__)
        finally:
            job.finished = True

    job.task = asyncio.create_task(run(), name=f"console-replay-{job.job_id}")
    console.replays[job.job_id] = job
    raise web.HTTPSeeOther(f"{PREFIX}/dead-letters/replays/{job.job_id}")


def _replay_job(request: web.Request) -> ReplayJob:
    job = request.app[CONSOLE].replays.get(request.match_info["job_id"])
    if job is None:
        raise management.NotFound("no such replay in this process")
    return job


async def replay_page(request: web.Request) -> web.Response:
    return _render(
        request, "replay.html", {"title": "Replay of dead letters", "job": _replay_job(request)}
    )


async def replay_progress(request: web.Request) -> web.Response:
    return _render(request, "_replay_progress.html", {"job": _replay_job(request)})


# -- events --------------------------------------------------------------------------------------


async def event_lookup(request: web.Request) -> web.Response:
    event_id = request.query.get("event_id", "").strip()
    found = None
    if event_id:
        if "\x00" in event_id or len(event_id) > validation.MAX_EVENT_ID_LENGTH:
            raise validation.invalid("event_id", "is not an event id")
        found = await request.app[CONSOLE].mgmt.get_event(event_id)
    return _render(
        request, "event.html", {"title": "Event lookup", "event_id": event_id, "event": found}
    )


async def _not_found(request: web.Request) -> web.Response:
    raise management.NotFound("no such page")


ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("GET", "/sign-in", sign_in_form),
    ("POST", "/sign-in", sign_in),
    ("POST", "/sign-out", sign_out),
    ("GET", "/", overview),
    ("GET", "/overview/stats", overview_stats),
    ("GET", "/subscriptions", subscriptions),
    ("GET", "/subscriptions/{subscription_id}", subscription),
    ("POST", "/subscriptions/{subscription_id}/enable", enable_subscription),
    ("POST", "/subscriptions/{subscription_id}/disable", disable_subscription),
    ("POST", "/subscriptions/{subscription_id}/rotate-secret", rotate_secret),
    ("POST", "/subscriptions/{subscription_id}/test", send_test),
    ("GET", "/deliveries", deliveries),
    ("GET", "/deliveries/{delivery_id}", delivery_detail),
    ("POST", "/deliveries/{delivery_id}/retry", retry_delivery),
    ("POST", "/deliveries/{delivery_id}/cancel", cancel_delivery),
    ("GET", "/dead-letters", dead_letters),
    ("POST", "/dead-letters/replay", start_replay),
    ("GET", "/dead-letters/replays/{job_id}", replay_page),
    ("GET", "/dead-letters/replays/{job_id}/progress", replay_progress),
    ("GET", "/events", event_lookup),
)


async def _stop_replays(app: web.Application) -> None:
    tasks = [j.task for j in app[CONSOLE].replays.values() if j.task and not j.task.done()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def build(
    mgmt: management.Management,
    *,
    token: str,
    signers: signing.SignerRegistry,
    limiter: console_session.SignInLimiter | None = None,
) -> web.Application:
    """The console sub-application, to be mounted with ``app.add_subapp(PREFIX, ...)``.
    Without a token it serves only a page saying how to enable it."""
    app = web.Application(middlewares=[_frame, _auth], client_max_size=256 * 1024)
    app[CONSOLE] = Console(
        mgmt=mgmt,
        sessions=console_session.Sessions(token) if token else None,
        limiter=limiter or console_session.SignInLimiter(),
        signers=signers,
    )
    _setup_templates(app)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_static("/static/", PACKAGE_DIR / "static", append_version=False)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    app.on_shutdown.append(_stop_replays)
    return app
