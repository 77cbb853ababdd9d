"""The ``/v1`` admin REST API: routes, bearer auth, problem details.

Requests are checked by ``dispatcher.validation`` (the same checks the CLI runs); a
``ValidationError`` becomes a 400 problem with its code and offending field. Every rejection
happens before anything is written; the writes themselves are single statements or transactions in
``dispatcher.db.management``. Errors are RFC 9457 ``application/problem+json``::

    {"type": "urn:dispatcher:problem:<code>", "title": ..., "status": 400,
     "detail": ..., "code": "<code>", "field": "<offending field or null>"}

Auth: every ``/v1`` route needs ``Authorization: Bearer <DISPATCHER_ADMIN_TOKEN>`` (constant
time compare). With no token configured (allowed only on a loopback listener, see
``config.Settings``) ``/v1`` answers 503 ``admin_token_not_configured``: never open.

This module must not hold SQL, read the environment, or log secrets, tokens or bodies.
"""

from __future__ import annotations

import hmac
import http
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from dispatcher import logs, signing, ssrf, validation
from dispatcher.db import management
from dispatcher.web import openapi

log = structlog.get_logger("dispatcher.api")

PREFIX: Final = "/v1"
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"


class ProblemError(Exception):
    """A request the API answers with a problem document instead of a result."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {
        "type": f"urn:dispatcher:problem:{code}",
        "title": http.HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        "field": field,
    }
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def delivery_id(value: str) -> int:
    """Path ids: anything that is not a delivery id is an unknown delivery (404)."""
    if not validation.is_delivery_id(value):
        raise management.NotFound(f"delivery {value[:40]!r} does not exist")
    return int(value)


def subscription_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise management.NotFound(f"subscription {value[:40]!r} does not exist") from None


# -- HTTP ---------------------------------------------------------------------------------------

MANAGEMENT: web.AppKey[management.Management] = web.AppKey("management", management.Management)
POLICY: web.AppKey[ssrf.AddressPolicy] = web.AppKey("policy", ssrf.AddressPolicy)
SIGNERS: web.AppKey[signing.SignerRegistry] = web.AppKey("signers", signing.SignerRegistry)
TOKEN: web.AppKey[str] = web.AppKey("token", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_matches(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, supplied = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(
        supplied.strip().encode("utf-8", "replace"), token.encode("utf-8", "replace")
    )


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(
        401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="dispatcher"'}
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProblemError as exc:
        return problem_response(
            exc.status, exc.code, exc.detail, field=exc.field, headers=exc.headers
        )
    except validation.ValidationError as exc:
        return problem_response(400, exc.code, exc.detail, field=exc.field)
    except management.NotFound as exc:
        return problem_response(404, exc.code, exc.detail)
    except management.Conflict as exc:
        return problem_response(409, exc.code, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return problem_response(
            exc.status, f"http_{exc.status}", exc.reason or "error", headers=headers
        )
    except Exception as exc:
        # Logged and answered as a 500 problem; never a silent pass. A database error is
        # logged by its names only: its text can quote the row, secrets included.
        if isinstance(getattr(exc, "sqlstate", None), str):
            log.error(
                "api_request_failed",
                method=request.method,
                path=request.path,
                error=logs.error_text(exc),
            )
        else:
            log.exception("api_request_failed", method=request.method, path=request.path)
        return problem_response(500, "internal_error", "the server failed to handle the request")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[TOKEN]
    if not token:
        raise ProblemError(
            503,
            "admin_token_not_configured",
            "the admin API is disabled: set DISPATCHER_ADMIN_TOKEN to enable it",
        )
    header = request.headers.get("Authorization")
    if header is None:
        raise _unauthorized("missing Authorization: Bearer <token> header")
    if not token_matches(header, token):
        raise _unauthorized("invalid bearer token")
    return await handler(request)


def probe_guard(token: str, protected_paths: Collection[str]) -> Any:
    """Middleware for the root app: the probe/metrics paths not configured as open need the
    same bearer token as /v1."""
    protected = frozenset(protected_paths)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in protected and not (
            token and token_matches(request.headers.get("Authorization"), token)
        ):
            return problem_response(
                401,
                "unauthorized",
                "this endpoint requires the admin bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="dispatcher"'},
            )
        return await handler(request)

    return guard


async def _body(request: web.Request, *, required: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw:  # whitespace alone is not an absent body: it is invalid JSON
        if required:
            raise validation.invalid("body", "a JSON object body is required", "body_required")
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise validation.invalid("body", "is not valid JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise validation.invalid("body", "must be a JSON object", "invalid_body")
    return data


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _openapi(request: web.Request) -> web.Response:
    return _json(openapi.document())


async def _create_subscription(request: web.Request) -> web.Response:
    body = await _body(request, required=True)
    spec = validation.validate_subscription_create(body, request.app[POLICY], request.app[SIGNERS])
    created = await request.app[MANAGEMENT].create_subscription(spec)
    log.info("subscription_created", subscription=created["id"])
    return _json(created, 201)


async def _list_subscriptions(request: web.Request) -> web.Response:
    q = request.query
    enabled_raw = q.get("enabled")
    if enabled_raw not in (None, "true", "false"):
        raise validation.invalid("enabled", "must be true or false")
    event_type = q.get("event_type")
    if event_type is not None:
        validation.text(
            event_type, "event_type", max_length=validation.MAX_EVENT_TYPE_LENGTH, min_length=1
        )
    page = await request.app[MANAGEMENT].list_subscriptions(
        limit=validation.page_limit(q),
        after=validation.subscription_cursor(q),
        enabled=None if enabled_raw is None else enabled_raw == "true",
        event_type=event_type,
        search=validation.validate_search(q),
    )
    return _json(validation.page_body(page.items, page.next_key, "subscriptions"))


async def _get_subscription(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    return _json(await request.app[MANAGEMENT].get_subscription(sid))


async def _update_subscription(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    body = await _body(request, required=True)
    changes = validation.validate_subscription_update(
        body, request.app[POLICY], request.app[SIGNERS]
    )
    updated = await request.app[MANAGEMENT].update_subscription(sid, changes)
    log.info("subscription_updated", subscription=str(sid), fields=sorted(changes))
    return _json(updated)


async def _delete_subscription(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    await request.app[MANAGEMENT].delete_subscription(sid)
    log.info("subscription_deleted", subscription=str(sid))
    return web.Response(status=204)


async def _enable_subscription(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    await _body(request)
    result = await request.app[MANAGEMENT].enable_subscription(sid)
    log.info("subscription_enabled", subscription=str(sid))
    return _json(result)


async def _disable_subscription(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    reason = validation.validate_disable(await _body(request))
    result = await request.app[MANAGEMENT].disable_subscription(sid, reason)
    log.info("subscription_disabled", subscription=str(sid), reason=reason)
    return _json(result)


async def _rotate_secret(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    secret, grace = validation.validate_rotation(await _body(request))
    result = await request.app[MANAGEMENT].rotate_secret(sid, secret, grace)
    log.info("subscription_secret_rotated", subscription=str(sid), grace_seconds=grace)
    return _json(result)


async def _list_subscription_events(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    q = request.query
    page = await request.app[MANAGEMENT].list_subscription_events(
        sid,
        limit=validation.page_limit(q),
        before_id=validation.id_cursor(q, "subscription_events"),
    )
    return _json(validation.page_body(page.items, page.next_key, "subscription_events"))


async def _send_test(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    payload = validation.validate_test_event(await _body(request))
    return _json(await request.app[MANAGEMENT].send_test_event(sid, payload), 202)


async def _retry_dead(request: web.Request) -> web.Response:
    sid = subscription_id(request.match_info["subscription_id"])
    since = validation.validate_retry_dead(await _body(request, required=True))
    result = await request.app[MANAGEMENT].retry_dead(sid, since)
    log.info("deliveries_replayed", subscription=str(sid), retried=result["retried"])
    return _json(result)


async def _list_deliveries(request: web.Request) -> web.Response:
    q = request.query
    filters = management.DeliveryFilter(**validation.validate_delivery_filter(q))
    page = await request.app[MANAGEMENT].list_deliveries(
        filters, limit=validation.page_limit(q), before_id=validation.id_cursor(q, "deliveries")
    )
    return _json(validation.page_body(page.items, page.next_key, "deliveries"))


async def _get_delivery(request: web.Request) -> web.Response:
    did = delivery_id(request.match_info["delivery_id"])
    return _json(await request.app[MANAGEMENT].get_delivery(did))


async def _retry_delivery(request: web.Request) -> web.Response:
    did = delivery_id(request.match_info["delivery_id"])
    await _body(request)
    result = await request.app[MANAGEMENT].retry_delivery(did)
    log.info("delivery_retry_requested", delivery_id=did)
    return _json(result, 202)


async def _cancel_delivery(request: web.Request) -> web.Response:
    did = delivery_id(request.match_info["delivery_id"])
    await _body(request)
    result = await request.app[MANAGEMENT].cancel_delivery(did)
    log.info("delivery_cancelled", delivery_id=did)
    return _json(result)


async def _get_event(request: web.Request) -> web.Response:
    event_id = request.match_info["event_id"]
    if "\x00" in event_id or not 1 <= len(event_id) <= validation.MAX_EVENT_ID_LENGTH:
        raise management.NotFound(f"event {event_id[:40]!r} does not exist")
    return _json(await request.app[MANAGEMENT].get_event(event_id))


async def _overview(request: web.Request) -> web.Response:
    return _json(await request.app[MANAGEMENT].overview())


async def _list_unrouted(request: web.Request) -> web.Response:
    q = request.query
    page = await request.app[MANAGEMENT].list_unrouted_events(
        limit=validation.page_limit(q), before_id=validation.id_cursor(q, "events")
    )
    return _json(validation.page_body(page.items, page.next_key, "events"))


# (method, path relative to /v1, handler): the OpenAPI document is checked against this list.
ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("GET", "/openapi.json", _openapi),
    ("POST", "/subscriptions", _create_subscription),
    ("GET", "/subscriptions", _list_subscriptions),
    ("GET", "/subscriptions/{subscription_id}", _get_subscription),
    ("PATCH", "/subscriptions/{subscription_id}", _update_subscription),
    ("DELETE", "/subscriptions/{subscription_id}", _delete_subscription),
    ("POST", "/subscriptions/{subscription_id}/enable", _enable_subscription),
    ("POST", "/subscriptions/{subscription_id}/disable", _disable_subscription),
    ("POST", "/subscriptions/{subscription_id}/rotate-secret", _rotate_secret),
    ("GET", "/subscriptions/{subscription_id}/events", _list_subscription_events),
    ("POST", "/subscriptions/{subscription_id}/test", _send_test),
    ("POST", "/subscriptions/{subscription_id}/retry-dead", _retry_dead),
    ("GET", "/deliveries", _list_deliveries),
    ("GET", "/deliveries/{delivery_id}", _get_delivery),
    ("POST", "/deliveries/{delivery_id}/retry", _retry_delivery),
    ("POST", "/deliveries/{delivery_id}/cancel", _cancel_delivery),
    ("GET", "/unrouted-events", _list_unrouted),
    ("GET", "/overview", _overview),
    ("GET", "/events/{event_id}", _get_event),
)


def build(
    mgmt: management.Management,
    *,
    token: str,
    policy: ssrf.AddressPolicy,
    signers: signing.SignerRegistry,
) -> web.Application:
    """The /v1 sub-application, to be mounted with ``app.add_subapp(PREFIX, ...)``."""
    app = web.Application(middlewares=[_errors, _auth], client_max_size=1024 * 1024)
    app[MANAGEMENT] = mgmt
    app[TOKEN] = token
    app[POLICY] = policy
    app[SIGNERS] = signers
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    # No catch-all route: it would answer 404 for a known path with the wrong method. aiohttp's
    # own 404 and 405 (with Allow) pass through this app's middlewares, so they are problem
    # documents behind the same auth.
    return app
