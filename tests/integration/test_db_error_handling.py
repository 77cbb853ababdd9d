"""Every loop and request path outside the delivery core treats a lost database the same way,
through ``dispatcher.db.pool.ERRORS``, including asyncpg's ``InternalClientError`` (what a
backend terminated mid-operation can raise, MagicStack/asyncpg#784): the gauge loop counts
it and carries on, the agent's runner retries, the agent's API answers 503 and the operator
CLI prints one line instead of a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import prometheus_client as prom
import pytest
from aiohttp import web

from dispatcher import gauges, metrics, ssrf
from dispatcher.agent import api as agent_api
from dispatcher.agent import runner
from dispatcher.cli import context, manage
from dispatcher.db import pool as db_pool
from tests import support

BROKEN = asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress")


class BrokenPool:
    """Counts calls; every database operation raises ``BROKEN``."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self) -> Any:
        self.calls += 1
        raise BROKEN

    @contextlib.asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Any]:
        self._fail()
        yield None  # pragma: no cover

    def acquire(self) -> Any:
        return self._acquire()

    async def fetchval(self, *_args: Any) -> Any:
        return self._fail()


def test_internal_client_error_is_a_database_error() -> None:
    # Not a PostgresError nor an InterfaceError: a tuple of those two misses it.
    assert not isinstance(BROKEN, asyncpg.PostgresError | asyncpg.InterfaceError)
    assert isinstance(BROKEN, db_pool.ERRORS)


async def test_gauge_loop_counts_the_failure_and_keeps_going() -> None:
    registry = prom.CollectorRegistry()
    pool = BrokenPool()
    loop = gauges.GaugeLoop(pool, metrics.Metrics(registry), interval_seconds=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        await support.wait_for(lambda: pool.calls >= 3 or task.done(), message="three tries")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)  # re-raises if the loop died of the error
    assert pool.calls >= 3
    assert (registry.get_sample_value("dispatcher_db_stats_refresh_errors_total") or 0) >= 3


async def test_agent_runner_survives_and_retries() -> None:
    pool = BrokenPool()
    work = runner.Runner(pool, worker_id="t", poll_interval_seconds=0.01, step_delay_seconds=0)
    stop = asyncio.Event()
    task = asyncio.create_task(work.run(stop))
    try:
        await support.wait_for(lambda: pool.calls >= 3 or task.done(), message="three tries")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert pool.calls >= 3


async def test_agent_api_answers_503() -> None:
    cfg = agent_api.ApiConfig(
        webhook_secret="whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY",
        policy=ssrf.AddressPolicy.from_strings(["127.0.0.1/32"]),
    )
    http = web.AppRunner(agent_api.build_app(BrokenPool(), cfg), access_log=None)
    await http.setup()
    site = web.TCPSite(http, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{http.addresses[0][1]}"
    body = {
        "prospects": [{"email": "ana@stripe.com"}],
        "criteria": {},
        "webhook_url": "http://127.0.0.1:9/cb",
    }
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/readyz") as resp:
                assert resp.status == 503
            async with session.post(base + agent_api.SUBMIT_PATH, json=body) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"] == "unavailable"
    finally:
        await http.cleanup()


async def test_operator_cli_prints_one_line(dsn: str) -> None:
    async def operation(_m: Any) -> Any:
        raise BROKEN

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")},
        "DATABASE_URL": dsn,
    }
    # In a thread: the CLI runs its own event loop.
    with pytest.raises(context.CliError, match=r"^database: InternalClientError: cannot switch"):
        await asyncio.to_thread(manage._execute, context.Context.from_env(env), operation)
