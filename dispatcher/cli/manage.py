"""Operator commands mirroring the admin API: ``subscriptions add|list|get|update|enable|
disable|delete|rotate-secret|events|test``, ``deliveries list|get|retry|retry-dead|cancel``,
``events get|unrouted``.

They talk to the database directly, through the same validators (``dispatcher.validation``)
and the same statements (``dispatcher.db.management``) as ``/v1``, so both accept and reject
the same input. Output is a readable table or, with ``--json``, the API's JSON (listings: one
page, ``{"items": [...], "next_cursor": ...}``). Every failure exits 2 with one clear line on
stderr, never a traceback or a secret. Does not read the environment: commands receive the
``Context``. The database modules are imported when a command runs, not when the parser is
built.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher import validation
from dispatcher.cli import context

if TYPE_CHECKING:
    from dispatcher.db import management

Operation = Callable[["management.Management"], Awaitable[Any]]


def _execute(ctx: context.Context, operation: Operation) -> Any:
    """Run one management operation on a short-lived pool; map failures to CliError."""
    from dispatcher import ssrf  # noqa: PLC0415
    from dispatcher.db import management, repository  # noqa: PLC0415
    from dispatcher.db import pool as db_pool  # noqa: PLC0415

    async def main(dsn: str) -> Any:
        pool = await db_pool.create_pool(
            dsn, min_size=1, max_size=1, application_name="dispatcher-cli"
        )
        try:
            repo = repository.Repository(pool, box=box)
            # The host of a new or changed URL is resolved on the same path as /v1's.
            return await operation(
                management.Management(pool, repo, check_url=ssrf.resolving_check(policy))
            )
        finally:
            await pool.close()

    box = ctx.secret_box()
    policy = ctx.address_policy()
    with ctx.database() as dsn:
        try:
            return context.run(main(dsn))
        except validation.ValidationError as exc:
            raise context.CliError(exc.one_line()) from None
        except management.ManagementError as exc:
            raise context.CliError(f"{exc.detail} [{exc.code}]") from None
        except db_pool.ERRORS as exc:
            raise context.CliError(f"database: {type(exc).__name__}: {exc}") from None


def _validated(check: Callable[[], Any]) -> Any:
    try:
        return check()
    except validation.ValidationError as exc:
        raise context.CliError(exc.one_line()) from None


def _json_arg(text: str, flag: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise context.CliError(f"{flag}: not valid JSON") from None


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str] | None:
    if items is None:
        return None
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise context.CliError(f"{flag}: expected NAME=VALUE, got {item!r}")
        out[key] = value
    return out


# -- output --------------------------------------------------------------------------------------


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """Columns sized to their content; ``columns`` is (header, key)."""

    def cell(row: Mapping[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return str(value)

    cells = [[cell(r, key) for _h, key in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _k) in enumerate(columns)]
    lines = ["  ".join(h.upper().ljust(w) for (h, _k), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    sys.stdout.write("\n".join(line.rstrip() for line in lines) + "\n")


def _fields(record: Mapping[str, Any], skip: Sequence[str] = ()) -> None:
    width = max(len(k) for k in record)
    for key, value in record.items():
        if key in skip:
            continue
        shown = orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)
        print(f"{key.ljust(width)}  {'-' if value is None else shown}")


SUBSCRIPTION_COLUMNS = (
    ("id", "id"),
    ("enabled", "enabled"),
    ("max", "max_in_flight"),
    ("rate/s", "rate_limit_per_second"),
    ("event types", "event_types"),
    ("url", "url"),
)
DELIVERY_COLUMNS = (
    ("id", "id"),
    ("state", "state"),
    ("attempts", "attempts"),
    ("status", "last_status"),
    ("event type", "event_type"),
    ("event id", "event_id"),
    ("subscription", "subscription_id"),
    ("created", "created_at"),
)
ATTEMPT_COLUMNS = (
    ("#", "attempt"),
    ("manual", "manual"),
    ("started", "started_at"),
    ("ms", "duration_ms"),
    ("outcome", "outcome"),
    ("status", "status_code"),
    ("error", "error"),
)
SUBSCRIPTION_EVENT_COLUMNS = (
    ("at", "at"),
    ("kind", "kind"),
    ("reason", "reason"),
    ("source", "source"),
)
EVENT_COLUMNS = (
    ("event id", "event_id"),
    ("type", "event_type"),
    ("result", "route_result"),
    ("target", "subscription_id"),
    ("created", "created_at"),
)


def _show_subscription(args: argparse.Namespace, sub: Mapping[str, Any]) -> None:
    if args.json:
        context.print_json(sub)
    else:
        _fields(sub)


def _show_delivery(args: argparse.Namespace, d: Mapping[str, Any]) -> None:
    if args.json:
        context.print_json(d)
        return
    _fields(d, skip=("attempt_log", "payload"))
    if "attempt_log" in d:
        print()
        _table(d["attempt_log"], ATTEMPT_COLUMNS)


# -- subscriptions --------------------------------------------------------------------------------


def _signers() -> Any:
    from dispatcher import signing  # noqa: PLC0415

    return signing.SignerRegistry.load()


def _delivery_filter(filters: Mapping[str, Any]) -> management.DeliveryFilter:
    from dispatcher.db import management  # noqa: PLC0415

    return management.DeliveryFilter(**filters)


def cmd_add(args: argparse.Namespace, ctx: context.Context) -> int:
    body: dict[str, Any] = {
        "url": args.url,
        "event_types": args.event_type,
        "max_in_flight": args.max_in_flight,
        "description": args.description,
    }
    if args.secret is not None:
        body["secret"] = args.secret
    if args.signature_header is not None:
        body["signature_header"] = args.signature_header
    headers = _pairs(args.header, "--header")
    if headers is not None:
        body["headers"] = headers
    if args.rate_limit is not None:
        body["rate_limit_per_second"] = args.rate_limit if args.rate_limit > 0 else None
    metadata = _pairs(args.metadata, "--metadata")
    if metadata is not None:
        body["metadata"] = metadata
    policy = ctx.address_policy()
    spec = _validated(lambda: validation.validate_subscription_create(body, policy, _signers()))
    context.print_json(_execute(ctx, lambda m: m.create_subscription(spec)))
    return 0


def cmd_list(args: argparse.Namespace, ctx: context.Context) -> int:
    query = _query(args, event_type=args.event_type)
    if args.enabled is not None:
        query["enabled"] = args.enabled
    _validated(lambda: validation.page_limit(query))
    _validated(lambda: validation.subscription_cursor(query))
    if args.event_type is not None:
        _validated(
            lambda: validation.text(
                args.event_type,
                "--event-type",
                max_length=validation.MAX_EVENT_TYPE_LENGTH,
                min_length=1,
            )
        )

    async def fetch(m: management.Management, q: dict[str, str]) -> dict[str, Any]:
        page = await m.list_subscriptions(
            limit=validation.page_limit(q),
            after=validation.subscription_cursor(q),
            enabled=None if args.enabled is None else args.enabled == "true",
            event_type=args.event_type,
        )
        return validation.page_body(page.items, page.next_key, "subscriptions")

    items, cursor = _pages(args, ctx, fetch, query)
    _print_page(args, items, cursor, SUBSCRIPTION_COLUMNS)
    return 0


def _subscription_id(value: str) -> Any:
    return _validated(lambda: validation.parse_uuid(value, "SUBSCRIPTION_ID"))


def cmd_get(args: argparse.Namespace, ctx: context.Context) -> int:
    sid = _subscription_id(args.id)
    _show_subscription(args, _execute(ctx, lambda m: m.get_subscription(sid)))
    return 0


def cmd_update(args: argparse.Namespace, ctx: context.Context) -> int:
    sid = _subscription_id(args.id)
    body: dict[str, Any] = {}
    if args.url is not None:
        body["url"] = args.url
    if args.event_type is not None:
        body["event_types"] = args.event_type
    headers = _pairs(args.header, "--header")
    if headers is not None:
        body["headers"] = headers
    if args.clear_headers:
        body["headers"] = {}
    if args.signature_header is not None:
        body["signature_header"] = args.signature_header or None
    if args.max_in_flight is not None:
        body["max_in_flight"] = args.max_in_flight
    if args.rate_limit is not None:
        body["rate_limit_per_second"] = args.rate_limit if args.rate_limit > 0 else None
    if args.retry_policy is not None:
        body["retry_policy"] = _json_arg(args.retry_policy, "--retry-policy")
    if args.description is not None:
        body["description"] = args.description
    metadata = _pairs(args.metadata, "--metadata")
    if metadata is not None:
        body["metadata"] = metadata
    if not body:
        raise context.CliError("nothing to change; see `dispatcher subscriptions update --help`")
    policy = ctx.address_policy()
    changes = _validated(lambda: validation.validate_subscription_update(body, policy, _signers()))
    _show_subscription(args, _execute(ctx, lambda m: m.update_subscription(sid, changes)))
    return 0


def cmd_enable(args: argparse.Namespace, ctx: context.Context) -> int:
    sid = _subscription_id(args.id)
    _show_subscription(args, _execute(ctx, lambda m: m.enable_subscription(sid)))
    return 0


def cmd_disable(args: argparse.Namespace, ctx: context.Context) -> int:
    sid = _subscription_id(args.id)
    reason = _validated(lambda: validation.validate_disable({"reason": args.reason}))
    _show_subscription(args, _execute(ctx, lambda m: m.disable_subscription(sid, reason)))
    return 0


def cmd_delete(args: argparse.Namespace, ctx: context.Context) -> int:
    sid = _subscription_id(args.id)
    _execute(ctx, lambda m: m.delete_subscription(sid))
    if args.json:
        context.print_json({"id": str(sid), "deleted": True})
    else:
        print(f"deleted subscription {sid}")
    return 0


def cmd_rotate(args: argparse.Namespace, ctx: context.Context) -> int:
    sid = _subscription_id(args.id)
    body: dict[str, Any] = {"grace_period_seconds": args.grace}
    if args.secret is not None:
        body["secret"] = args.secret
    secret, grace = _validated(lambda: validation.validate_rotation(body))
    result = _execute(ctx, lambda m: m.rotate_secret(sid, secret, grace))
    if args.json:
        context.print_json(result)
    else:
        print(f"new secret: {result['secret']}")
        ends = result["rotation_ends_at"]
        print(f"the old secret also signs until {ends}" if ends else "the old secret is retired")
    return 0


def cmd_subscription_events(args: argparse.Namespace, ctx: context.Context) -> int:
    sid = _subscription_id(args.id)
    query = _query(args)
    _validated(lambda: validation.page_limit(query))

    async def fetch(m: management.Management, q: dict[str, str]) -> dict[str, Any]:
        page = await m.list_subscription_events(
            sid,
            limit=validation.page_limit(q),
            before_id=validation.id_cursor(q, "subscription_events"),
        )
        return validation.page_body(page.items, page.next_key, "subscription_events")

    items, cursor = _pages(args, ctx, fetch, query)
    _print_page(args, items, cursor, SUBSCRIPTION_EVENT_COLUMNS)
    return 0


def cmd_test(args: argparse.Namespace, ctx: context.Context) -> int:
    sid = _subscription_id(args.id)
    body = {} if args.payload is None else {"payload": _json_arg(args.payload, "--payload")}
    payload = _validated(lambda: validation.validate_test_event(body))
    result = _execute(ctx, lambda m: m.send_test_event(sid, payload))
    if args.json:
        context.print_json(result)
    else:
        print(f"queued test event {result['event_id']} ({result['event_type']})")
    return 0


# -- deliveries ----------------------------------------------------------------------------------


def _delivery_id(value: str) -> int:
    # As /v1 answers for a path id: anything that is not a delivery id is an unknown delivery.
    if not validation.is_delivery_id(value):
        raise context.CliError(f"delivery {value[:40]!r} does not exist [not_found]")
    return int(value)


def _pages(
    args: argparse.Namespace,
    ctx: context.Context,
    fetch: Callable[[management.Management, dict[str, str]], Awaitable[dict[str, Any]]],
    query: dict[str, str],
) -> tuple[list[dict[str, Any]], str | None]:
    """One page, or every page with --all (all within one pool)."""

    async def walk(m: management.Management) -> tuple[list[dict[str, Any]], str | None]:
        items: list[dict[str, Any]] = []
        q = dict(query)
        while True:
            page = await fetch(m, q)
            items += page["items"]
            cursor = page["next_cursor"]
            if cursor is None or not args.all:
                return items, cursor
            q["cursor"] = cursor

    result: tuple[list[dict[str, Any]], str | None] = _execute(ctx, walk)
    return result


def _query(args: argparse.Namespace, **extra: str | None) -> dict[str, str]:
    q = {"limit": str(args.limit)}
    if args.cursor:
        q["cursor"] = args.cursor
    q.update({k: v for k, v in extra.items() if v is not None})
    return q


def cmd_deliveries_list(args: argparse.Namespace, ctx: context.Context) -> int:
    query = _query(
        args,
        subscription_id=args.subscription,
        state=args.state,
        event_type=args.event_type,
        created_after=args.since,
        created_before=args.until,
    )
    filters = _validated(lambda: validation.validate_delivery_filter(query))

    async def fetch(m: management.Management, q: dict[str, str]) -> dict[str, Any]:
        page = await m.list_deliveries(
            _delivery_filter(filters),
            limit=validation.page_limit(q),
            before_id=validation.id_cursor(q, "deliveries"),
        )
        return validation.page_body(page.items, page.next_key, "deliveries")

    items, cursor = _pages(args, ctx, fetch, query)
    _print_page(args, items, cursor, DELIVERY_COLUMNS)
    return 0


def _print_page(
    args: argparse.Namespace,
    items: list[dict[str, Any]],
    cursor: str | None,
    columns: Sequence[tuple[str, str]],
) -> None:
    if args.json:
        context.print_json({"items": items, "next_cursor": cursor})
        return
    _table(items, columns)
    if cursor:
        print(f"more: --cursor {cursor}  (or --all)", file=sys.stderr)


def cmd_deliveries_get(args: argparse.Namespace, ctx: context.Context) -> int:
    did = _delivery_id(args.id)
    _show_delivery(args, _execute(ctx, lambda m: m.get_delivery(did)))
    return 0


def cmd_deliveries_retry(args: argparse.Namespace, ctx: context.Context) -> int:
    did = _delivery_id(args.id)
    _show_delivery(args, _execute(ctx, lambda m: m.retry_delivery(did)))
    return 0


def cmd_deliveries_cancel(args: argparse.Namespace, ctx: context.Context) -> int:
    did = _delivery_id(args.id)
    _show_delivery(args, _execute(ctx, lambda m: m.cancel_delivery(did)))
    return 0


def cmd_retry_dead(args: argparse.Namespace, ctx: context.Context) -> int:
    sid = _subscription_id(args.subscription)
    since = _validated(lambda: validation.validate_retry_dead({"since": args.since}))
    if args.batch < 1:
        raise context.CliError("--batch must be at least 1")

    def progress(done: int, total: int) -> None:
        # stderr, so --json output on stdout stays parseable.
        print(f"retry-dead: {done}/{total} queued", file=sys.stderr, flush=True)

    result = _execute(
        ctx, lambda m: m.retry_dead(sid, since, batch=args.batch, on_progress=progress)
    )
    if args.json:
        context.print_json(result)
    else:
        print(f"queued {result['retried']} dead deliveries for another attempt")
    return 0


# -- events --------------------------------------------------------------------------------------


def cmd_events_get(args: argparse.Namespace, ctx: context.Context) -> int:
    event = _execute(ctx, lambda m: m.get_event(args.event_id))
    if args.json:
        context.print_json(event)
        return 0
    _fields(event, skip=("deliveries",))
    print()
    _table(event["deliveries"], DELIVERY_COLUMNS)
    return 0


def cmd_events_unrouted(args: argparse.Namespace, ctx: context.Context) -> int:
    query = _query(args)
    _validated(lambda: validation.page_limit(query))

    async def fetch(m: management.Management, q: dict[str, str]) -> dict[str, Any]:
        page = await m.list_unrouted_events(
            limit=validation.page_limit(q), before_id=validation.id_cursor(q, "events")
        )
        return validation.page_body(page.items, page.next_key, "events")

    items, cursor = _pages(args, ctx, fetch, query)
    _print_page(args, items, cursor, EVENT_COLUMNS)
    return 0


# -- parser --------------------------------------------------------------------------------------


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (as the API returns it)")


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit", type=int, default=validation.DEFAULT_PAGE_LIMIT, help="page size (1-200)"
    )
    p.add_argument("--cursor", help="continue after a previous page")
    p.add_argument("--all", action="store_true", help="follow cursors to the last page")


def _subscription_commands(sub: Any) -> None:
    subs = sub.add_parser("subscriptions", help="manage subscriptions").add_subparsers(
        dest="subcommand", required=True, metavar="SUBCOMMAND"
    )
    p = subs.add_parser("add", help="create a subscription; prints it as JSON (secret included)")
    p.add_argument("--url", required=True)
    p.add_argument(
        "--event-type", action="append", required=True, help="exact type or prefix.* (repeatable)"
    )
    p.add_argument("--secret", help="whsec_… secret; generated when omitted")
    p.add_argument("--signature-header", help="also sign the body in this header (sha256=<hex>)")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=10,
        help=f"requests on the wire at once ({validation.MAX_IN_FLIGHT_RANGE[0]}-"
        f"{validation.MAX_IN_FLIGHT_RANGE[1]})",
    )
    p.add_argument("--header", action="append", metavar="NAME=VALUE", help="custom header")
    p.add_argument("--rate-limit", type=float, help="requests per second (0 = unlimited)")
    p.add_argument("--description", default="")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_add)

    p = subs.add_parser("list", help="list subscriptions, oldest first")
    p.add_argument("--enabled", choices=("true", "false"), help="only enabled or disabled ones")
    p.add_argument("--event-type", help="only those that receive this event type")
    _paging(p)
    _json_flag(p)
    p.set_defaults(func=cmd_list)

    p = subs.add_parser("get", help="show one subscription (never its secret)")
    p.add_argument("id", metavar="SUBSCRIPTION_ID")
    _json_flag(p)
    p.set_defaults(func=cmd_get)

    p = subs.add_parser("update", help="change some fields of a subscription")
    p.add_argument("id", metavar="SUBSCRIPTION_ID")
    p.add_argument("--url")
    p.add_argument("--event-type", action="append", help="replaces the list (repeatable)")
    p.add_argument("--header", action="append", metavar="NAME=VALUE", help="replaces headers")
    p.add_argument("--clear-headers", action="store_true", help="remove every custom header")
    p.add_argument("--signature-header", help="body-HMAC header name ('' to stop sending it)")
    p.add_argument("--max-in-flight", type=int)
    p.add_argument("--rate-limit", type=float, help="requests per second (0 = unlimited)")
    p.add_argument("--retry-policy", metavar="JSON", help='e.g. {"max_attempts": 5}; null clears')
    p.add_argument("--description")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="replaces metadata")
    _json_flag(p)
    p.set_defaults(func=cmd_update)

    p = subs.add_parser("enable", help="enable; parked deliveries are queued again")
    p.add_argument("id", metavar="SUBSCRIPTION_ID")
    _json_flag(p)
    p.set_defaults(func=cmd_enable)

    p = subs.add_parser("disable", help="disable; queued deliveries are parked, not lost")
    p.add_argument("id", metavar="SUBSCRIPTION_ID")
    p.add_argument("--reason", default="disabled by an operator")
    _json_flag(p)
    p.set_defaults(func=cmd_disable)

    p = subs.add_parser("delete", help="delete with its deliveries and attempt log")
    p.add_argument("id", metavar="SUBSCRIPTION_ID")
    _json_flag(p)
    p.set_defaults(func=cmd_delete)

    p = subs.add_parser(
        "rotate-secret", help="new secret; the old one keeps signing during the grace period"
    )
    p.add_argument("id", metavar="SUBSCRIPTION_ID")
    p.add_argument(
        "--grace",
        type=int,
        default=validation.DEFAULT_GRACE_SECONDS,
        help="seconds both secrets sign (default one day; 0 retires the old one now)",
    )
    p.add_argument("--secret", help="whsec_… secret to use; generated when omitted")
    _json_flag(p)
    p.set_defaults(func=cmd_rotate)

    p = subs.add_parser(
        "events", help="health and audit trail (disabled/enabled/paused/resumed), newest first"
    )
    p.add_argument("id", metavar="SUBSCRIPTION_ID")
    _paging(p)
    _json_flag(p)
    p.set_defaults(func=cmd_subscription_events)

    p = subs.add_parser("test", help="send a dispatcher.test event to this subscription only")
    p.add_argument("id", metavar="SUBSCRIPTION_ID")
    p.add_argument("--payload", metavar="JSON", help="a JSON object (default: a small message)")
    _json_flag(p)
    p.set_defaults(func=cmd_test)


def add_commands(sub: Any) -> None:
    """The ``subscriptions``, ``deliveries`` and ``events`` groups."""
    _subscription_commands(sub)
    deliveries = sub.add_parser("deliveries", help="inspect, retry and cancel deliveries")
    group = deliveries.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

    p = group.add_parser("list", help="list deliveries, newest first")
    p.add_argument("--subscription", metavar="SUBSCRIPTION_ID")
    p.add_argument("--state", choices=validation.DELIVERY_STATES)
    p.add_argument("--event-type")
    p.add_argument("--since", metavar="TIME", help="created at or after (RFC 3339)")
    p.add_argument("--until", metavar="TIME", help="created before (RFC 3339)")
    _paging(p)
    _json_flag(p)
    p.set_defaults(func=cmd_deliveries_list)

    p = group.add_parser("get", help="one delivery with its full attempt history")
    p.add_argument("id", metavar="DELIVERY_ID")
    _json_flag(p)
    p.set_defaults(func=cmd_deliveries_get)

    p = group.add_parser("retry", help="attempt now (same webhook-id), recorded as manual")
    p.add_argument("id", metavar="DELIVERY_ID")
    _json_flag(p)
    p.set_defaults(func=cmd_deliveries_retry)

    p = group.add_parser(
        "retry-dead", help="replay a subscription's dead deliveries since a time (manual)"
    )
    p.add_argument("--subscription", required=True, metavar="SUBSCRIPTION_ID")
    p.add_argument("--since", required=True, metavar="TIME", help="died at or after (RFC 3339)")
    p.add_argument("--batch", type=int, default=500, help="deliveries per transaction")
    _json_flag(p)
    p.set_defaults(func=cmd_retry_dead)

    p = group.add_parser("cancel", help="cancel a pending, retrying or parked delivery")
    p.add_argument("id", metavar="DELIVERY_ID")
    _json_flag(p)
    p.set_defaults(func=cmd_deliveries_cancel)

    events = sub.add_parser("events", help="inspect events")
    group = events.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = group.add_parser("get", help="one event with its deliveries")
    p.add_argument("event_id", metavar="EVENT_ID")
    _json_flag(p)
    p.set_defaults(func=cmd_events_get)

    p = group.add_parser("unrouted", help="events that reached no subscription, newest first")
    _paging(p)
    _json_flag(p)
    p.set_defaults(func=cmd_events_unrouted)
