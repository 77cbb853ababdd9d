"""The root HTTP app: liveness and readiness probes and Prometheus metrics; mounts ``/v1``.

Must not block the event loop: readiness does one cheap database round trip with a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import prometheus_client as prom
from aiohttp import web

READY_TIMEOUT_SECONDS = 2.0


class Readiness:
    """What the probes report. ``draining`` flips readiness off during shutdown."""

    def __init__(self, ping: Callable[[], Awaitable[None]]) -> None:
        self._ping = ping
        self.started = False
        self.draining = False
        # Each returns why the process cannot do its work (None when it can), e.g. a claim
        # loop that keeps failing while the database still answers the ping.
        self.checks: list[Callable[[], str | None]] = []

    async def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.started:
            return False, "starting"
        for check in self.checks:
            reason = check()
            if reason is not None:
                return False, reason
        try:
            await asyncio.wait_for(self._ping(), READY_TIMEOUT_SECONDS)
        except Exception as exc:
            return False, f"database: {type(exc).__name__}"
        return True, "ok"


READINESS: web.AppKey[Readiness] = web.AppKey("readiness", Readiness)
REGISTRY: web.AppKey[prom.CollectorRegistry] = web.AppKey("registry", prom.CollectorRegistry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ok, reason = await request.app[READINESS].ready()
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "reason": reason}, status=200 if ok else 503
    )


async def metrics(request: web.Request) -> web.Response:
    # OpenMetrics when the scraper asks for it (Prometheus does by default), else text 0.0.4.
    encode, content_type = prom.exposition.choose_encoder(request.headers.get("Accept", ""))
    body = encode(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": content_type})


def build_app(
    readiness: Readiness,
    registry: prom.CollectorRegistry,
    *,
    api: web.Application | None = None,
    console: web.Application | None = None,
    middlewares: Sequence[Any] = (),
) -> web.Application:
    """``api`` (the admin sub-app from ``admin_api.build``) is mounted at /v1 and ``console``
    (``console.pages.build``) at /ui; ``middlewares`` guard the probes that are not configured
    open (``admin_api.probe_guard``)."""
    app = web.Application(client_max_size=1024 * 1024, middlewares=list(middlewares))
    app[READINESS] = readiness
    app[REGISTRY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if api is not None:
        app.add_subapp("/v1", api)
    if console is not None:
        app.add_subapp("/ui", console)
    return app
