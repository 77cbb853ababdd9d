"""Composition root of ``dispatcher agent``: pool, job runner, LISTEN wake-ups and the API.

Owns the stop event's consequences: stop accepting (listener closes), let running jobs
finish the step they are committing, release their locks, close the pool. Shares nothing
with the dispatcher process but the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiohttp import web

from dispatcher import config, secretbox, ssrf
from dispatcher.agent import api, runner, store
from dispatcher.agent import settings as agent_settings
from dispatcher.db import listener, migrate
from dispatcher.db import pool as db_pool

log = structlog.get_logger("dispatcher.agent")


# The settings live in their own light module: the CLI's settings table reads their defaults.
AgentSettings = agent_settings.AgentSettings


class Agent:
    """One agent process. ``await run(stop)`` until ``stop`` is set."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        try:
            self.policy = ssrf.AddressPolicy.from_strings(settings.allow_cidrs, settings.https_only)
        except ValueError as exc:
            raise config.ConfigError(f"allow-list: {exc}") from None
        try:
            self.box = secretbox.SecretBox.from_spec(settings.secret_keys)
        except secretbox.SecretBoxError as exc:
            raise config.ConfigError(f"DISPATCHER_SECRET_KEYS: {exc}") from None
        self.pool: Any = None
        self.runner: runner.Runner | None = None
        self.bound_port: int | None = None
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        # One connection per running job (it holds the job's lock) plus a few for the API.
        self.pool = await db_pool.create_pool(
            s.database_url,
            min_size=1,
            max_size=s.concurrency + 4,
            application_name="dispatcher-agent",
        )
        try:
            # The dispatcher's schema (the outbox it publishes to) and the agent's own.
            await migrate.require_current(self.pool, migrate.CORE, store.MIGRATIONS)
            await self._serve(stop)
        finally:
            await self.pool.close()

    async def _serve(self, stop: asyncio.Event) -> None:
        s = self.settings
        work = self.runner = runner.Runner(
            self.pool,
            worker_id=s.worker_id,
            concurrency=s.concurrency,
            poll_interval_seconds=s.poll_interval_seconds,
            step_delay_seconds=s.step_delay_seconds,
            max_runs=s.max_runs,
        )
        cfg = api.ApiConfig(
            webhook_secret=s.webhook_secret,
            api_key=s.api_key,
            max_prospects=s.max_prospects,
            max_body_bytes=s.max_body_bytes,
            policy=self.policy,
            box=self.box,
        )
        web_app = api.build_app(self.pool, cfg, on_submitted=lambda _job: work.wake())
        http = web.AppRunner(web_app, access_log=None)
        await http.setup()
        site = web.TCPSite(http, s.listen_host, s.listen_port)
        await site.start()
        self.bound_port = _bound_port(http)
        listen = listener.Listener(
            s.database_url, {store.NOTIFY_CHANNEL: work.wake}, on_connect=work.wake
        )
        background_stop = asyncio.Event()
        tasks = [
            asyncio.create_task(work.run(stop), name="agent-runner"),
            asyncio.create_task(listen.run(background_stop), name="agent-listener"),
        ]
        self.ready.set()
        log.info(
            "agent_started",
            listen=f"{s.listen_host}:{self.bound_port}",
            worker=s.worker_id,
            auth=bool(s.api_key),
            max_prospects=s.max_prospects,
        )
        try:
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({stopped, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopped}:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            stopped.cancel()
        finally:
            log.info("agent_draining", running=len(work.running()))
            stop.set()
            background_stop.set()
            # The runner lets the step being committed finish; bounded so shutdown is too.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
            for task in tasks:
                task.cancel()
            await http.cleanup()
            log.info("agent_stopped")


def _bound_port(http: web.AppRunner) -> int | None:
    for addr in http.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return None
