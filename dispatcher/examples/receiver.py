"""An example webhook receiver (aiohttp) built on :mod:`dispatcher.receiver`.

It verifies both signature schemes, de-duplicates by ``webhook-id``, records what it accepted
for ``GET /events``, and can fail a share of requests on purpose so tests and the demo get a
flaky endpoint. It must not print or log secrets, signatures or bodies: the only output is
one summary line (type and status) per processed event.

    python -m dispatcher.examples.receiver --listen 127.0.0.1:9000 --secret whsec_...
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from dispatcher import receiver

WEBHOOK_PATHS = ("/webhooks", "/agent-callbacks/lead-status")
# Recorded with each event; the signature headers are deliberately not among them.
RECORDED_HEADERS = ("webhook-id", "webhook-timestamp", "content-type", "user-agent")

EventCallback = Callable[[dict[str, Any], Mapping[str, str]], Awaitable[None]]

EVENTS = web.AppKey("events", list[dict[str, Any]])
STATS = web.AppKey("stats", dict[str, int])
STORE = web.AppKey("store", receiver.MemoryIdempotencyStore)


def build_app(
    secret: str,
    *,
    signature_header: str | None = "X-AgentX-Signature",
    on_event: EventCallback | None = None,
    fail_ratio: float = 0.0,
    seed: int | None = None,
) -> web.Application:
    """The receiver app: ``POST /webhooks``, ``POST /agent-callbacks/lead-status``,
    ``GET /events`` (what was processed, in arrival order) and ``GET /stats``.

    ``fail_ratio`` of webhook requests get a 500 before verification or processing (drawn
    from ``random.Random(seed)``); they are neither recorded nor remembered, so the sender's
    retry is processed normally."""
    if not 0.0 <= fail_ratio <= 1.0:
        raise ValueError("fail_ratio must be within [0, 1]")
    verifier = receiver.Verifier(secret, signature_header=signature_header)
    store = receiver.MemoryIdempotencyStore()
    events: list[dict[str, Any]] = []
    stats = {"processed": 0, "injected_failures": 0}
    rng = random.Random(seed)

    async def record(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        if on_event is not None:
            await on_event(payload, headers)
        events.append(
            {
                "webhook_id": headers.get("webhook-id"),
                "event": payload,
                "headers": {name: headers[name] for name in RECORDED_HEADERS if name in headers},
                "verified": {
                    "standard_webhooks": True,
                    "body_hmac": verifier.signature_header is not None,
                },
                "received_at": time.time(),
            }
        )
        stats["processed"] += 1

    verified_handler = receiver.webhook_handler(verifier, store, record)

    async def webhook(request: web.Request) -> web.StreamResponse:
        if fail_ratio and rng.random() < fail_ratio:
            stats["injected_failures"] += 1
            return web.json_response({"error": "injected_failure"}, status=500)
        return await verified_handler(request)

    async def list_events(_request: web.Request) -> web.Response:
        return web.json_response(events)

    async def show_stats(_request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application()
    app[EVENTS] = events
    app[STATS] = stats
    app[STORE] = store
    for path in WEBHOOK_PATHS:
        app.router.add_post(path, webhook)
    app.router.add_get("/events", list_events)
    app.router.add_get("/stats", show_stats)
    return app


def summary_line(payload: Mapping[str, Any], headers: Mapping[str, str]) -> str:
    """One line per event: id, type and status only — never the body or a signature."""
    kind = next(
        (payload[k] for k in ("event", "type", "event_type") if isinstance(payload.get(k), str)),
        "-",
    )
    status = payload.get("status")
    return (
        f"event webhook_id={headers.get('webhook-id', '-')} type={kind} "
        f"status={status if isinstance(status, str) else '-'}"
    )


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher.examples.receiver",
        description="Example dispatcher webhook receiver.",
    )
    parser.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 9000))
    parser.add_argument("--secret", required=True, help="the subscription secret (whsec_...)")
    parser.add_argument(
        "--signature-header",
        default="X-AgentX-Signature",
        help="body-HMAC header to require; empty string to check Standard Webhooks only",
    )
    parser.add_argument("--fail-ratio", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    host, port = args.listen

    async def print_event(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        print(summary_line(payload, headers), flush=True)

    app = build_app(
        args.secret,
        signature_header=args.signature_header or None,
        on_event=print_event,
        fail_ratio=args.fail_ratio,
        seed=args.seed,
    )
    print(f"receiver listening on http://{host}:{port}{WEBHOOK_PATHS[0]}", flush=True)
    web.run_app(app, host=host, port=port, print=None)


if __name__ == "__main__":
    main()
