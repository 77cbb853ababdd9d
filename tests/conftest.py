"""Fixtures: a real Postgres (DATABASE_URL, else the embedded one), a migrated template
database cloned per test, real receivers, and in-process dispatchers with fast settings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dispatcher import app, config, signing
from dispatcher.agent import store
from dispatcher.db import embedded
from tests import leaks, support

# Every secret the code under test generates in this process is looked for in the output.
leaks.wrap_generator(signing, "generate_secret")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    modules = {item.module for item in items if isinstance(item, pytest.Function)}
    for module in modules:
        leaks.register_module(module)
    leaks.register_module(support)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A test whose captured output (log lines, stdout, stderr, spawned dispatchers' log files)
    holds a secret or token fails, whatever it asserted."""
    outcome = yield
    report = outcome.get_result()
    # Each phase's report repeats the sections of the phases before it: judge its own only.
    own = [(title, text) for title, text in report.sections if title.endswith(call.when)]
    if call.when == "teardown":
        problems = leaks.scan_sections(own)
        leaks.forget_files()
    else:
        problems = [p for p in leaks.scan_sections(own) if not p.startswith("log ")]
    if problems and report.outcome != "failed":
        report.outcome = "failed"
        report.longrepr = "a secret reached captured output: " + "; ".join(sorted(set(problems)))


TEMPLATE = f"dispatcher_tpl_{os.getpid()}"


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    server = embedded.EmbeddedPostgres(support.ROOT / ".dispatcher" / "test-pgdata")
    yield server.start()
    server.stop()


async def _admin(dsn: str) -> Any:
    return await asyncpg.connect(dsn)


@pytest.fixture(scope="session")
def template_dsn(server_dsn: str) -> Iterator[str]:
    async def create() -> None:
        conn = await _admin(server_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
            await conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
        finally:
            await conn.close()
        dsn = support.with_database(server_dsn, TEMPLATE)
        await app.migrate_database(dsn)
        # The reference agent's own track: most integration tests run the agent too.
        await app.migrate_database(dsn, store.MIGRATIONS)

    async def drop() -> None:
        conn = await _admin(server_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    yield support.with_database(server_dsn, TEMPLATE)
    asyncio.run(drop())


@contextlib.asynccontextmanager
async def _scratch_database(server_dsn: str, name: str, create_sql: str) -> AsyncIterator[str]:
    """Create a database with ``create_sql`` for one test, yield its DSN, drop it after."""
    conn = await _admin(server_dsn)
    try:
        await conn.execute(create_sql)
    finally:
        await conn.close()
    yield support.with_database(server_dsn, name)
    conn = await _admin(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def dsn(server_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test (a clone of the template)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    create = f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"'
    async with _scratch_database(server_dsn, name, create) as url:
        yield url


@pytest.fixture
async def empty_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A database with no schema at all (the ``dsn`` fixture's clones are migrated)."""
    name = f"t_empty_{uuid.uuid4().hex[:12]}"
    async with _scratch_database(server_dsn, name, f'CREATE DATABASE "{name}"') as url:
        yield url


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[Any]:
    p = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def receiver() -> AsyncIterator[support.Receiver]:
    r = await support.Receiver().start()
    yield r
    r.release.set()
    await r.stop()


@pytest.fixture
async def make_receiver() -> AsyncIterator[Any]:
    made: list[support.Receiver] = []

    async def make() -> support.Receiver:
        r = await support.Receiver().start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.release.set()
        await r.stop()


def fast_settings(dsn: str, **changes: Any) -> config.Settings:
    """Production code, test-sized timings: retries in milliseconds, quick polls."""
    retry = changes.pop(
        "retry",
        config.RetryPolicy(base_seconds=0.01, cap_seconds=0.05, max_attempts=5, max_4xx_attempts=2),
    )
    base = config.Settings(
        database_url=dsn,
        listen_port=0,
        poll_interval_seconds=0.05,
        request_timeout_seconds=5.0,
        connect_timeout_seconds=1.0,
        lease_margin_seconds=2.0,
        shutdown_grace_seconds=5.0,
        retry=retry,
        allow_cidrs=("127.0.0.1/32",),
        worker_id=f"test-{uuid.uuid4().hex[:6]}",
        # The circuit breaker is off unless a test asks for it: it would pause subscriptions
        # that tests fail on purpose (tests/integration/test_health.py turns it on).
        endpoint_health=config.EndpointHealthPolicy(breaker_failure_ratio=0, interval_seconds=0.05),
    )
    return base.replace(**changes)


class Running:
    def __init__(self, dispatcher: app.Dispatcher, task: asyncio.Task[None], stop: asyncio.Event):
        self.dispatcher = dispatcher
        self.task = task
        self.stop_event = stop

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def start_dispatcher(dsn: str) -> AsyncIterator[Any]:
    """Start in-process dispatchers against the test database; all are stopped afterwards."""
    running: list[Running] = []

    async def start(**changes: Any) -> Running:
        # No DNS from the suite: a new subscription's host is "resolved" by a resolver that
        # knows no names (the check then lets it through), unless a test passes its own.
        resolver = changes.pop("url_resolver", support.StaticResolver({}))
        d = app.Dispatcher(fast_settings(dsn, **changes), url_resolver=resolver)
        stop = asyncio.Event()
        task = asyncio.create_task(d.run(stop))
        ready = asyncio.create_task(d.ready.wait())
        done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert ready in done, "dispatcher did not become ready"
        r = Running(d, task, stop)
        running.append(r)
        return r

    yield start
    for r in running:
        if not r.task.done():
            with contextlib.suppress(Exception):
                await r.stop()


@pytest.fixture
def tmp_log(tmp_path: Path) -> Path:
    return tmp_path / "dispatcher.log"
