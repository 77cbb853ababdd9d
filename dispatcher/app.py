"""Composition root: builds pool, HTTP session, metrics, repository, sender and loops, and owns
the stop event and the staged shutdown. Nothing else creates long-lived resources.

Shutdown order: readiness off → stop claiming and routing → drain requests on the wire
(bounded grace) → release leases left → flush acks → stop background loops → close HTTP
session → export the last spans (bounded) → close pool → stop the admin listener.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp.abc
import prometheus_client as prom
import structlog
from aiohttp import web

from dispatcher import (
    __version__,
    claimer,
    config,
    endpoint_health,
    gauges,
    logs,
    metrics,
    operational,
    retention,
    router,
    secretbox,
    sender,
    signing,
    ssrf,
    tracing,
)
from dispatcher.db import listener, management, migrate, repository
from dispatcher.db import operational as db_operational
from dispatcher.db import pool as db_pool
from dispatcher.web import admin_api, probes
from dispatcher.web.console import pages as console_pages

log = structlog.get_logger("dispatcher.app")


class Dispatcher:
    """One dispatcher process. ``await run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        settings: config.Settings,
        *,
        registry: prom.CollectorRegistry | None = None,
        url_resolver: aiohttp.abc.AbstractResolver | None = None,
    ) -> None:
        self.settings = settings
        # Resolves a new subscription URL's host for the early check (system DNS when None).
        self.url_resolver = url_resolver
        self.registry = registry or prom.CollectorRegistry()
        self.metrics = metrics.Metrics(
            self.registry, max_subscriptions=settings.metrics_max_subscriptions, version=__version__
        )
        try:
            self.policy = ssrf.AddressPolicy.from_strings(settings.allow_cidrs, settings.https_only)
        except ValueError as exc:
            raise config.ConfigError(f"allow-list: {exc}") from None
        try:
            self.box = secretbox.SecretBox.from_spec(settings.secret_keys)
        except secretbox.SecretBoxError as exc:
            raise config.ConfigError(f"DISPATCHER_SECRET_KEYS: {exc}") from None
        self.pool: Any = None
        self.repo: repository.Repository | None = None
        self.claimer: claimer.Claimer | None = None
        self.tracer: tracing.Tracer = tracing.OFF
        self.readiness: probes.Readiness | None = None
        self.bound_port: int | None = None
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        # No session state on these connections (LISTEN has its own): skip the reset round
        # trip on every release, which claims and acks paid each time (bench profile).
        self.pool = await db_pool.create_pool(
            s.database_url,
            min_size=2,
            max_size=8,
            reset_session=False,
            # Read by the dead-letter trigger that writes the operational events (sql/011).
            extra_settings={db_operational.DEAD_EVENTS_SETTING: str(s.dead_events_per_minute)},
        )
        try:
            await migrate.require_current(self.pool)
            await self._serve(stop)
        finally:
            await self.pool.close()

    async def _serve(self, stop: asyncio.Event) -> None:
        s = self.settings
        repo = self.repo = repository.Repository(self.pool, box=self.box)
        if not self.box.encrypting:
            log.warning("secrets_stored_in_plaintext", hint="set DISPATCHER_SECRET_KEYS")
        self.readiness = probes.Readiness(repo.ping)
        signers = signing.SignerRegistry.load()
        mgmt = management.Management(
            self.pool, repo, check_url=ssrf.resolving_check(self.policy, self.url_resolver)
        )
        management_api = admin_api.build(
            mgmt, token=s.admin_token, policy=self.policy, signers=signers
        )
        guarded = [f"/{name}" for name in config.PROBE_ENDPOINTS if name not in s.open_endpoints]
        runner = web.AppRunner(
            probes.build_app(
                self.readiness,
                self.registry,
                api=management_api,
                console=console_pages.build(mgmt, token=s.admin_token, signers=signers),
                middlewares=[admin_api.probe_guard(s.admin_token, guarded)] if guarded else [],
            ),
            access_log=None,
        )
        await runner.setup()
        site = web.TCPSite(runner, s.listen_host, s.listen_port)
        await site.start()
        self.bound_port = _bound_port(runner)
        policy = self.policy
        resolver = ssrf.build_connector_resolver(policy)
        session = sender.build_session(
            max_connections=s.max_in_flight, resolver=resolver, tls=sender.tls_context()
        )
        http_sender = sender.Sender(
            session,
            signers,
            request_timeout_seconds=s.request_timeout_seconds,
            connect_timeout_seconds=s.connect_timeout_seconds,
            response_max_bytes=s.response_max_bytes,
            response_log_bytes=s.response_log_bytes,
            guard=_cached_guard(policy),
            is_blocked=ssrf.is_blocked_error,
        )
        # The claimer reports every attempt to the monitor; the monitor's loop gets the
        # claimer (below) to send its probes.
        monitor = endpoint_health.Monitor(
            self.pool,
            repo,
            self.metrics,
            s.endpoint_health,
            worker=s.worker_id,
            lease_seconds=s.lease_seconds,
        )
        tracer = self.tracer = tracing.start(s.tracing, version=__version__)
        work = self.claimer = claimer.Claimer(
            repo, http_sender, self.metrics, s, health=monitor, tracer=tracer
        )
        self.readiness.checks.append(work.not_ready_reason)
        route = router.Router(
            repo,
            self.metrics,
            batch=s.route_batch,
            poll_interval_seconds=s.poll_interval_seconds,
            on_routed=work.wake,
            tracer=tracer,
        )
        reaper = router.Reaper(
            repo,
            self.metrics,
            max_attempts=s.retry.max_attempts,
            interval_seconds=max(s.poll_interval_seconds, 0.05),
            on_requeued=work.wake,
        )

        def rescan() -> None:
            route.wake()
            work.wake()

        listen = listener.Listener(
            s.database_url,
            {repository.OUTBOX_CHANNEL: route.wake, repository.WORK_CHANNEL: work.wake},
            on_connect=rescan,
        )
        gauge_loop = gauges.GaugeLoop(
            self.pool, self.metrics, interval_seconds=s.gauge_interval_seconds
        )
        gauges.bind_pool(self.metrics, self.pool)
        # Before anything is claimed: subscription label slots go to the oldest subscriptions,
        # the same ones on every replica (the loop's first run just repeats this).
        try:
            await gauge_loop.refresh()
        except db_pool.ERRORS as exc:
            log.warning("gauge_refresh_failed", error=logs.error_text(exc))
        background_stop = asyncio.Event()
        acks = asyncio.create_task(work.acks.run(), name="acks")
        loops = [
            asyncio.create_task(listen.run(background_stop), name="listener"),
            asyncio.create_task(route.run(background_stop), name="router"),
            asyncio.create_task(reaper.run(background_stop), name="reaper"),
            asyncio.create_task(gauge_loop.run(background_stop), name="gauges"),
            asyncio.create_task(monitor.run(background_stop, work), name="health"),
            asyncio.create_task(
                operational.SummaryFlusher(
                    self.pool, interval_seconds=max(s.poll_interval_seconds, 0.05)
                ).run(background_stop),
                name="dead_letter_summaries",
            ),
            asyncio.create_task(
                retention.Pruner(self.pool, self.metrics, s.retention).run(background_stop),
                name="retention",
            ),
        ]
        claim = asyncio.create_task(work.run(), name="claimer")
        self.readiness.started = True
        self.ready.set()
        log.info(
            "dispatcher_started",
            listen=f"{s.listen_host}:{self.bound_port}",
            worker=s.worker_id,
            max_in_flight=s.max_in_flight,
        )
        try:
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait(
                {stopped, claim, acks, *loops}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done - {stopped}:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            stopped.cancel()
        finally:
            log.info("dispatcher_draining", in_flight=work.in_flight())
            self.readiness.draining = True
            work.stop_claiming()
            background_stop.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(claim, 5)
            released = await work.drain(s.shutdown_grace_seconds)
            work.acks.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(acks, 10)
            await asyncio.wait(loops, timeout=5)
            for task in [acks, *loops]:
                task.cancel()
            await session.close()
            await resolver.close()  # aiohttp does not close a resolver it was given
            await tracer.shutdown()
            await runner.cleanup()
            log.info("dispatcher_stopped", released=released, stale_acks=work.acks.stale)


def _cached_guard(policy: ssrf.AddressPolicy, max_entries: int = 4096) -> Any:
    """``ssrf.check_request_host`` remembering the URLs it passed: the verdict depends only on
    the URL and the process's fixed policy, and parsing the URL per attempt was ~2 % of the
    dispatcher's CPU (bench profile). Refusals are never cached, so they re-raise each time;
    hostnames are still judged by the resolver at connect time."""
    passed: set[str] = set()

    def guard(url: str) -> None:
        if url in passed:
            return
        ssrf.check_request_host(url, policy)
        if len(passed) >= max_entries:
            passed.clear()
        passed.add(url)

    return guard


def _bound_port(runner: web.AppRunner) -> int | None:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return None


async def migrate_database(dsn: str, track: migrate.Track = migrate.CORE) -> list[str]:
    conn = await db_pool.connect(dsn, application_name="dispatcher-migrate")
    try:
        return await migrate.apply(conn, track)
    finally:
        await conn.close()
