"""The agent's HTTP API (aiohttp): submit a lead-qualification job, read a job's state.

``POST /api/v1/lead-qualification`` validates, then writes the job and its callback
subscription in one transaction and answers ``202``; the work happens in the runner. A valid
W3C ``traceparent`` on the request is kept with the job, so the callbacks continue the
caller's trace (a malformed one is ignored, as the W3C specification asks). Errors
are JSON ``{"error", "field", "detail"}`` and a rejected request writes nothing. This module
must not run pipeline steps or send callbacks itself.
"""

from __future__ import annotations

import dataclasses
import hmac
import re
import secrets
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from dispatcher import secretbox, ssrf, tracing
from dispatcher.agent import store, validation
from dispatcher.db import pool as db_pool

log = structlog.get_logger("dispatcher.agent.api")

JOB_ID_RE = re.compile(r"lq-[0-9a-f]{20}")
SUBMIT_PATH = "/api/v1/lead-qualification"


@dataclasses.dataclass(frozen=True, slots=True)
class ApiConfig:
    webhook_secret: str = dataclasses.field(repr=False)
    api_key: str = dataclasses.field(repr=False, default="")
    max_prospects: int = 100
    max_body_bytes: int = 256 * 1024
    policy: ssrf.AddressPolicy = dataclasses.field(default_factory=ssrf.AddressPolicy)
    box: secretbox.SecretBox = secretbox.PLAINTEXT


def new_job_id() -> str:
    # 80 random bits: unguessable enough that a job id alone reveals nothing about others.
    return "lq-" + secrets.token_hex(10)


def _error(status: int, code: str, field: str | None, detail: str) -> web.Response:
    body: dict[str, Any] = {"error": code, "detail": detail}
    if field is not None:
        body["field"] = field
    return _json(body, status=status)


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def build_app(
    pool: Any,
    cfg: ApiConfig,
    *,
    on_submitted: Callable[[str], None] = lambda _job_id: None,
) -> web.Application:
    """The agent's aiohttp application over ``pool`` (an asyncpg pool)."""

    @web.middleware
    async def errors_and_auth(
        request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if cfg.api_key and request.path.startswith("/api/"):
            offered = request.headers.get("Authorization", "")
            scheme, _, token = offered.partition(" ")
            # Constant-time compare; bytes so non-ASCII input cannot raise.
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), cfg.api_key.encode()
            )
            if not ok:
                response = _error(
                    401, "unauthorized", "Authorization", "a valid bearer token is required"
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="agent"'
                return response
        try:
            result: web.StreamResponse = await handler(request)
            return result
        except web.HTTPRequestEntityTooLarge:
            return _error(
                413,
                "payload_too_large",
                "body",
                f"request body exceeds {cfg.max_body_bytes} bytes",
            )
        except web.HTTPException as exc:
            # aiohttp's own 404/405 as JSON too, so API clients parse one error shape.
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), None, exc.reason)

    async def submit(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return _error(400, "malformed_json", "body", f"body is not valid JSON: {exc}")
        try:
            job = validation.validate(body, max_prospects=cfg.max_prospects, policy=cfg.policy)
        except validation.ValidationError as exc:
            return _error(422, exc.code, exc.field, exc.detail)
        job_id = new_job_id()
        traceparent = tracing.parse_traceparent(request.headers.get("traceparent"))
        tracestate = (
            tracing.clean_tracestate(request.headers.get("tracestate")) if traceparent else None
        )
        try:
            async with pool.acquire() as conn:
                await store.create_job(
                    conn,
                    job_id=job_id,
                    prospects=job.prospects,
                    criteria=job.criteria,
                    webhook_url=job.webhook_url,
                    secret=cfg.webhook_secret,
                    box=cfg.box,
                    traceparent=traceparent,
                    tracestate=tracestate,
                )
        except db_pool.ERRORS as exc:
            log.warning("agent_job_not_stored", error=f"{type(exc).__name__}")
            return _error(503, "unavailable", None, "the job store is unavailable; retry later")
        log.info("agent_job_accepted", job_id=job_id, prospects=len(job.prospects))
        on_submitted(job_id)
        return _json(
            {"job_id": job_id, "status": "QUEUED"},
            status=202,
            headers={"Location": f"/api/v1/jobs/{job_id}"},
        )

    async def show(request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        found = None
        if JOB_ID_RE.fullmatch(job_id):
            async with pool.acquire() as conn:
                found = await store.get_job(conn, job_id)
        if found is None:
            return _error(404, "not_found", "job_id", f"no job {job_id!r}")
        return _json(found)

    async def healthz(_request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        try:
            await pool.fetchval("SELECT 1")
        except db_pool.ERRORS:
            return _json({"status": "database unavailable"}, status=503)
        return _json({"status": "ready"})

    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[errors_and_auth])
    app.router.add_post(SUBMIT_PATH, submit)
    app.router.add_get("/api/v1/jobs/{job_id}", show)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
