"""The OpenAPI 3 document of the ``/v1`` admin API, built from the same limits the validators use.

Served at ``/v1/openapi.json``. ``tests/integration/test_api_openapi.py`` checks that every
route ``dispatcher.web.admin_api`` registers is documented here and nothing else is, and a
schemathesis run checks the responses against it. The limits come from
``dispatcher.validation``. No I/O and no HTTP handling here.
"""

from __future__ import annotations

import functools
from typing import Any

from dispatcher import __version__, validation
from dispatcher.db import management

_NULLABLE_STRING = {"type": "string", "nullable": True}
_DATE_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_DATE_TIME = {"type": "string", "format": "date-time", "nullable": True}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


_AUTH_ERRORS = {
    "401": _problem("Missing or wrong bearer token"),
    "503": _problem("The admin API is disabled (no DISPATCHER_ADMIN_TOKEN configured)"),
}


def _op(
    op_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    params: list[dict[str, Any]] | None = None,
    body: str | None = None,
    body_required: bool = False,
    tag: str,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "tags": [tag],
        "responses": {**responses, **_AUTH_ERRORS},
    }
    if params:
        out["parameters"] = params
    if body is not None:
        out["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return out


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _schemas() -> dict[str, Any]:
    event_type = {
        "type": "string",
        "minLength": 1,
        "maxLength": validation.MAX_EVENT_TYPE_LENGTH,
        "pattern": validation.EVENT_TYPE_PATTERN,
    }
    header_name = {"type": "string", "pattern": validation.HEADER_NAME_PATTERN}
    retry_policy = {
        "type": "object",
        "nullable": True,
        "additionalProperties": False,
        "description": "Overrides of the configured retry policy for this subscription.",
        "properties": {
            name: {"type": kind, "minimum": low, "maximum": high}
            for name, (kind, low, high) in validation.RETRY_POLICY_FIELDS.items()
        },
    }
    headers = {
        "type": "object",
        "maxProperties": validation.MAX_HEADERS,
        "propertyNames": header_name,
        "additionalProperties": {
            "type": "string",
            "maxLength": validation.MAX_HEADER_VALUE_LENGTH,
            "pattern": validation.HEADER_VALUE_PATTERN,
        },
        "description": "Extra request headers sent with every delivery.",
    }
    metadata = {
        "type": "object",
        "maxProperties": validation.MAX_METADATA_KEYS,
        "propertyNames": {
            "minLength": 1,
            "maxLength": validation.MAX_METADATA_KEY_LENGTH,
            "pattern": validation.NO_NUL_PATTERN,
        },
        "additionalProperties": {
            "type": "string",
            "maxLength": validation.MAX_METADATA_VALUE_LENGTH,
            "pattern": validation.NO_NUL_PATTERN,
        },
    }
    writable: dict[str, Any] = {
        "url": {
            "type": "string",
            "minLength": 1,
            "maxLength": validation.MAX_URL_LENGTH,
            "pattern": validation.URL_PATTERN,
        },
        "event_types": {
            "type": "array",
            "minItems": 1,
            "maxItems": validation.MAX_EVENT_TYPES,
            "items": event_type,
        },
        "headers": headers,
        "signature_header": {**header_name, "nullable": True},
        "signers": {
            "type": "array",
            "maxItems": validation.MAX_SIGNERS,
            "items": {
                "type": "string",
                "minLength": 1,
                "maxLength": 100,
                "pattern": validation.NO_NUL_PATTERN,
            },
        },
        "max_in_flight": {
            "type": "integer",
            "minimum": validation.MAX_IN_FLIGHT_RANGE[0],
            "maximum": validation.MAX_IN_FLIGHT_RANGE[1],
        },
        "rate_limit_per_second": {
            "type": "number",
            "nullable": True,
            "minimum": 0,
            "exclusiveMinimum": True,
            "maximum": validation.MAX_RATE_PER_SECOND,
        },
        "retry_policy": retry_policy,
        "description": {
            "type": "string",
            "maxLength": validation.MAX_DESCRIPTION_LENGTH,
            "pattern": validation.NO_NUL_PATTERN,
        },
        "metadata": metadata,
    }
    secret = {
        "type": "string",
        "minLength": 16,
        "maxLength": validation.MAX_SECRET_LENGTH,
        "pattern": validation.NO_NUL_PATTERN,
    }
    subscription_props: dict[str, Any] = {
        "id": {"type": "string", "format": "uuid"},
        "url": {"type": "string"},
        "event_types": {"type": "array", "items": {"type": "string"}},
        "signature_header": _NULLABLE_STRING,
        "signers": {"type": "array", "items": {"type": "string"}},
        "headers": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Names of the custom headers; values are stored sealed and shown "
            "masked.",
        },
        "max_in_flight": {"type": "integer"},
        "rate_limit_per_second": {"type": "number", "nullable": True},
        "retry_policy": {"type": "object", "nullable": True},
        "description": {"type": "string"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "enabled": {"type": "boolean"},
        "disabled_reason": _NULLABLE_STRING,
        "disabled_at": _NULLABLE_DATE_TIME,
        "created_at": _DATE_TIME,
        "updated_at": _DATE_TIME,
        "rotating": {"type": "boolean"},
        "rotation_ends_at": _NULLABLE_DATE_TIME,
        # Endpoint health (null when not paused / never failed / never delivered).
        "paused_until": _NULLABLE_DATE_TIME,
        "paused_reason": _NULLABLE_STRING,
        "failing_since": _NULLABLE_DATE_TIME,
        "last_success_at": _NULLABLE_DATE_TIME,
    }
    subscription_event_props: dict[str, Any] = {
        "id": {"type": "integer"},
        "kind": {"type": "string", "enum": ["disabled", "enabled", "paused", "resumed"]},
        "reason": _NULLABLE_STRING,
        "source": {
            **_NULLABLE_STRING,
            "description": "Who made the change (application name: dispatcher, dispatcher-cli, …).",
        },
        "at": _DATE_TIME,
    }
    delivery_props: dict[str, Any] = {
        "id": {"type": "integer"},
        "event_id": {"type": "string"},
        "event_type": {"type": "string"},
        "subscription_id": {"type": "string", "format": "uuid"},
        "state": {"type": "string", "enum": list(validation.DELIVERY_STATES)},
        "attempts": {"type": "integer"},
        "next_attempt_at": _NULLABLE_DATE_TIME,
        "last_status": {"type": "integer", "nullable": True},
        "last_error": _NULLABLE_STRING,
        "ordering_key": _NULLABLE_STRING,
        "manual_retry_pending": {"type": "boolean"},
        "event_created_at": _DATE_TIME,
        "created_at": _DATE_TIME,
        "updated_at": _DATE_TIME,
        "finished_at": _NULLABLE_DATE_TIME,
    }
    attempt_props: dict[str, Any] = {
        "id": {"type": "integer"},
        "attempt": {"type": "integer"},
        "manual": {"type": "boolean"},
        "started_at": _DATE_TIME,
        "duration_ms": {"type": "number"},
        "outcome": {"type": "string"},
        "status_code": {"type": "integer", "nullable": True},
        "error": _NULLABLE_STRING,
        "response_body": _NULLABLE_STRING,
        "worker": _NULLABLE_STRING,
        "applied": {"type": "boolean"},
    }
    event_props: dict[str, Any] = {
        "event_id": {"type": "string"},
        "event_type": {"type": "string"},
        "payload": {},
        "subscription_id": {"type": "string", "format": "uuid", "nullable": True},
        "ordering_key": _NULLABLE_STRING,
        "created_at": _DATE_TIME,
        "routed_at": _NULLABLE_DATE_TIME,
        "route_result": {
            "type": "string",
            "nullable": True,
            "enum": ["routed", "unmatched", "unknown_subscription", None],
        },
        "delivery_count": {"type": "integer", "nullable": True},
    }

    def obj(props: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
        return {
            "type": "object",
            "required": list(props),
            "properties": props,
            "additionalProperties": not strict,
        }

    def page(item: str, kind: str) -> dict[str, Any]:
        return obj(
            {
                "items": {"type": "array", "items": _ref(item)},
                "next_cursor": {
                    "type": "string",
                    "pattern": validation.cursor_pattern(kind),
                    "nullable": True,
                    "description": "Pass as `cursor` for the next page; null on the last.",
                },
            }
        )

    return {
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details with a machine-readable code.",
            "required": ["type", "title", "status", "detail", "code"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "code": {"type": "string"},
                "field": _NULLABLE_STRING,
            },
        },
        "SubscriptionCreate": {
            "type": "object",
            "required": ["url", "event_types"],
            "additionalProperties": False,
            "properties": {**writable, "secret": secret},
        },
        "SubscriptionUpdate": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": writable,
        },
        "Subscription": obj(subscription_props),
        "SubscriptionWithSecret": obj({**subscription_props, "secret": {"type": "string"}}),
        "SubscriptionPage": page("Subscription", "subscriptions"),
        "SubscriptionEvent": obj(subscription_event_props),
        "SubscriptionEventPage": page("SubscriptionEvent", "subscription_events"),
        "Disable": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "reason": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": validation.MAX_REASON_LENGTH,
                    "pattern": validation.NO_NUL_PATTERN,
                }
            },
        },
        "Rotate": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "secret": secret,
                "grace_period_seconds": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": validation.MAX_GRACE_SECONDS,
                    "default": validation.DEFAULT_GRACE_SECONDS,
                },
            },
        },
        "TestEvent": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "payload": {
                    "type": "object",
                    "propertyNames": {"pattern": validation.NO_NUL_PATTERN},
                    "description": "Any JSON object whose keys and strings hold no NUL, "
                    f"nested at most {validation.MAX_PAYLOAD_DEPTH} levels.",
                }
            },
        },
        "TestEventResult": obj({"event_id": {"type": "string"}, "event_type": {"type": "string"}}),
        "RetryDead": {
            "type": "object",
            "required": ["since"],
            "additionalProperties": False,
            "properties": {
                "since": {
                    **_DATE_TIME,
                    "description": "Replay deliveries that became dead at or after this time.",
                }
            },
        },
        "RetryDeadResult": obj(
            {
                "subscription_id": {"type": "string", "format": "uuid"},
                "since": _DATE_TIME,
                "retried": {"type": "integer"},
            }
        ),
        "Delivery": obj(delivery_props),
        "Attempt": obj(attempt_props),
        "DeliveryDetail": obj(
            {
                **delivery_props,
                "payload": {},
                "attempt_log": {"type": "array", "items": _ref("Attempt")},
            }
        ),
        "DeliveryPage": page("Delivery", "deliveries"),
        "Event": obj(event_props),
        "EventDetail": obj(
            {**event_props, "deliveries": {"type": "array", "items": _ref("Delivery")}}
        ),
        "EventPage": page("Event", "events"),
        "Overview": obj(
            {
                "window_minutes": {"type": "integer"},
                "window_since": {
                    **_DATE_TIME,
                    "description": "Start of what the attempt figures cover: the window's "
                    "start, or later when window_cut (only the newest attempts are read).",
                },
                "window_cut": {"type": "boolean"},
                "deliveries": obj(
                    {state: {"type": "integer"} for state in management.QUEUED_STATES}
                ),
                "oldest_undelivered_at": _NULLABLE_DATE_TIME,
                "outbox_backlog": {"type": "integer"},
                "outbox_backlog_capped": {"type": "boolean"},
                "subscriptions": obj(
                    {k: {"type": "integer"} for k in ("up", "paused", "disabled")}
                ),
                "delivered": {"type": "integer"},
                "failed": {"type": "integer"},
                "success_ratio": {"type": "number", "nullable": True},
                "per_minute": {
                    "type": "array",
                    "items": obj(
                        {
                            "minute": _DATE_TIME,
                            "delivered": {"type": "integer"},
                            "failed": {"type": "integer"},
                        }
                    ),
                },
            }
        ),
    }


def _paths() -> dict[str, Any]:
    sub_id = _path("subscription_id", {"type": "string", "format": "uuid"})
    del_id = _path(
        "delivery_id", {"type": "integer", "minimum": 1, "maximum": validation.MAX_DELIVERY_ID}
    )
    limit = _query(
        "limit",
        {
            "type": "integer",
            "minimum": validation.PAGE_LIMIT_RANGE[0],
            "maximum": validation.PAGE_LIMIT_RANGE[1],
            "default": validation.DEFAULT_PAGE_LIMIT,
        },
        "Page size.",
    )

    def cursor(kind: str) -> dict[str, Any]:
        return _query(
            "cursor",
            {"type": "string", "pattern": validation.cursor_pattern(kind)},
            "`next_cursor` of the previous page.",
        )

    not_found = {"404": _problem("No such subscription")}
    bad = {"400": _problem("Invalid request (see `code` and `field`)")}
    s, d, e = "subscriptions", "deliveries", "events"
    return {
        "/openapi.json": {
            "get": _op(
                "getOpenApi",
                "This document",
                {
                    "200": {
                        "description": "OpenAPI 3 document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
                tag="meta",
            )
        },
        "/subscriptions": {
            "post": _op(
                "createSubscription",
                "Create a subscription; its secret is shown here and on rotation only",
                {"201": _ok("Created", "SubscriptionWithSecret"), **bad},
                body="SubscriptionCreate",
                body_required=True,
                tag=s,
            ),
            "get": _op(
                "listSubscriptions",
                "List subscriptions, oldest first (no secrets)",
                {"200": _ok("A page of subscriptions", "SubscriptionPage"), **bad},
                params=[
                    limit,
                    cursor("subscriptions"),
                    _query(
                        "enabled", {"type": "string", "enum": ["true", "false"]}, "Filter by state."
                    ),
                    _query(
                        "event_type",
                        {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": validation.MAX_EVENT_TYPE_LENGTH,
                            "pattern": validation.NO_NUL_PATTERN,
                        },
                        "Subscriptions listing exactly this event-type pattern.",
                    ),
                    _query(
                        "search",
                        {
                            "type": "string",
                            "maxLength": validation.MAX_SEARCH_LENGTH,
                            "pattern": validation.NO_NUL_PATTERN,
                        },
                        "Case-insensitive substring of the id, URL or description.",
                    ),
                ],
                tag=s,
            ),
        },
        "/subscriptions/{subscription_id}": {
            "parameters": [sub_id],
            "get": _op(
                "getSubscription",
                "Get a subscription (no secret)",
                {"200": _ok("The subscription", "Subscription"), **not_found},
                tag=s,
            ),
            "patch": _op(
                "updateSubscription",
                "Change some fields; absent fields are kept, null clears nullable ones",
                {"200": _ok("Updated", "Subscription"), **bad, **not_found},
                body="SubscriptionUpdate",
                body_required=True,
                tag=s,
            ),
            "delete": _op(
                "deleteSubscription",
                "Delete a subscription with its deliveries and attempt log",
                {"204": {"description": "Deleted"}, **not_found},
                tag=s,
            ),
        },
        "/subscriptions/{subscription_id}/enable": {
            "parameters": [sub_id],
            "post": _op(
                "enableSubscription",
                "Enable; parked deliveries are queued again",
                {"200": _ok("Enabled", "Subscription"), **bad, **not_found},
                tag=s,
            ),
        },
        "/subscriptions/{subscription_id}/disable": {
            "parameters": [sub_id],
            "post": _op(
                "disableSubscription",
                "Disable with a reason; queued deliveries are parked, not lost",
                {"200": _ok("Disabled", "Subscription"), **bad, **not_found},
                body="Disable",
                tag=s,
            ),
        },
        "/subscriptions/{subscription_id}/rotate-secret": {
            "parameters": [sub_id],
            "post": _op(
                "rotateSecret",
                "Replace the secret; the old one keeps signing alongside for the grace period",
                {
                    "200": _ok(
                        "Rotated; the new secret is in the response", "SubscriptionWithSecret"
                    ),
                    **bad,
                    **not_found,
                },
                body="Rotate",
                tag=s,
            ),
        },
        "/subscriptions/{subscription_id}/events": {
            "parameters": [sub_id],
            "get": _op(
                "listSubscriptionEvents",
                "Health and audit trail (disabled, enabled, paused, resumed), newest first; "
                "kept after the subscription is deleted",
                {
                    "200": _ok("A page of subscription events", "SubscriptionEventPage"),
                    **bad,
                    "404": _problem("No such subscription and no recorded history"),
                },
                params=[limit, cursor("subscription_events")],
                tag=s,
            ),
        },
        "/subscriptions/{subscription_id}/test": {
            "parameters": [sub_id],
            "post": _op(
                "sendTestEvent",
                "Publish a dispatcher.test event to this subscription only",
                {
                    "202": _ok("Queued", "TestEventResult"),
                    **bad,
                    **not_found,
                    "409": _problem("Subscription disabled"),
                },
                body="TestEvent",
                tag=s,
            ),
        },
        "/subscriptions/{subscription_id}/retry-dead": {
            "parameters": [sub_id],
            "post": _op(
                "retryDeadDeliveries",
                "Replay, as manual attempts, the dead deliveries of this subscription since a time",
                {
                    "200": _ok("How many were queued", "RetryDeadResult"),
                    **bad,
                    **not_found,
                    "409": _problem("Subscription disabled"),
                },
                body="RetryDead",
                body_required=True,
                tag=d,
            ),
        },
        "/deliveries": {
            "get": _op(
                "listDeliveries",
                "List deliveries, newest first",
                {"200": _ok("A page of deliveries", "DeliveryPage"), **bad},
                params=[
                    limit,
                    cursor("deliveries"),
                    _query(
                        "subscription_id",
                        {"type": "string", "format": "uuid"},
                        "Only this subscription.",
                    ),
                    _query(
                        "state",
                        {"type": "string", "enum": list(validation.DELIVERY_STATES)},
                        "Only this state.",
                    ),
                    _query(
                        "event_type",
                        {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": validation.MAX_EVENT_TYPE_LENGTH,
                            "pattern": validation.NO_NUL_PATTERN,
                        },
                        "Only this exact event type.",
                    ),
                    _query("created_after", _DATE_TIME, "Created at or after (RFC 3339)."),
                    _query("created_before", _DATE_TIME, "Created before (RFC 3339)."),
                ],
                tag=d,
            )
        },
        "/deliveries/{delivery_id}": {
            "parameters": [del_id],
            "get": _op(
                "getDelivery",
                "A delivery with its payload and full attempt history",
                {"200": _ok("The delivery", "DeliveryDetail"), **not_found},
                tag=d,
            ),
        },
        "/deliveries/{delivery_id}/retry": {
            "parameters": [del_id],
            "post": _op(
                "retryDelivery",
                "Attempt now (same webhook-id, fresh timestamp and signature), recorded as manual",
                {
                    "202": _ok("Queued", "DeliveryDetail"),
                    **bad,
                    **not_found,
                    "409": _problem("In flight, or subscription disabled"),
                },
                tag=d,
            ),
        },
        "/deliveries/{delivery_id}/cancel": {
            "parameters": [del_id],
            "post": _op(
                "cancelDelivery",
                "Cancel a pending, retrying or parked delivery",
                {
                    "200": _ok("Cancelled", "DeliveryDetail"),
                    **bad,
                    **not_found,
                    "409": _problem("Not cancellable in its state"),
                },
                tag=d,
            ),
        },
        "/events/{event_id}": {
            "parameters": [
                _path(
                    "event_id",
                    {"type": "string", "minLength": 1, "maxLength": validation.MAX_EVENT_ID_LENGTH},
                )
            ],
            "get": _op(
                "getEvent",
                "An event with its deliveries",
                {"200": _ok("The event", "EventDetail"), **not_found},
                tag=e,
            ),
        },
        "/unrouted-events": {
            "get": _op(
                "listUnroutedEvents",
                "Events that reached no subscription (unmatched or unknown target), newest first",
                {"200": _ok("A page of events", "EventPage"), **bad},
                params=[limit, cursor("events")],
                tag=e,
            )
        },
        "/overview": {
            "get": _op(
                "getOverview",
                "Queued work, oldest undelivered event, backlog, subscription states and "
                "delivered/failed attempts per minute over the recent window",
                {"200": _ok("The overview", "Overview")},
                tag=e,
            )
        },
    }


@functools.cache
def document() -> dict[str, Any]:
    """The whole document (built once; treat as read-only)."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "dispatcher admin API",
            "version": __version__,
            "description": (
                "Manage subscriptions, deliveries and events. Every route needs "
                "`Authorization: Bearer <DISPATCHER_ADMIN_TOKEN>`. Errors are RFC 9457 "
                "problem details with a machine-readable `code` and the offending `field`."
            ),
        },
        "servers": [{"url": "/v1"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
