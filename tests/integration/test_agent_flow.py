"""The agent's pipeline on a real Postgres with an in-process dispatcher and the example
receiver: event order and shapes, failure, transactional publishing, and two runners never
running one job."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

import dispatcher
from dispatcher import config, signing
from dispatcher.agent import app as agent_app
from dispatcher.agent import enrichment, steps
from dispatcher.examples import receiver as example_receiver
from tests import support

SECRET = signing.generate_secret()
PROSPECTS = ["ana@stripe.com", "raj@acme.io", "lee@dundermifflin.com", "kim@globex.com"]


class RunningAgent:
    def __init__(self, agent: agent_app.Agent, task: asyncio.Task[None], stop: asyncio.Event):
        self.agent = agent
        self.task = task
        self.stop_event = stop

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.agent.bound_port}"

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 20)


@pytest.fixture
async def start_agent(dsn: str) -> AsyncIterator[Any]:
    running: list[RunningAgent] = []

    async def start(**changes: Any) -> RunningAgent:
        fields: dict[str, Any] = {
            "database_url": dsn,
            "webhook_secret": SECRET,
            "listen_port": 0,
            "step_delay_seconds": 0.0,
            "poll_interval_seconds": 0.05,
            "allow_cidrs": ("127.0.0.1/32",),
        }
        settings = agent_app.AgentSettings(**{**fields, **changes})
        agent = agent_app.Agent(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        ready = asyncio.create_task(agent.ready.wait())
        done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        r = RunningAgent(agent, task, stop)
        running.append(r)
        return r

    yield start
    for r in running:
        if not r.task.done():
            await r.stop()


class ExampleReceiver:
    def __init__(self, app: web.Application, runner: web.AppRunner) -> None:
        self.app = app
        self.runner = runner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/agent-callbacks/lead-status"

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.app[example_receiver.EVENTS]

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        return [e["event"] for e in self.events if e["event"]["job_id"] == job_id]


@pytest.fixture
async def make_example_receiver() -> AsyncIterator[Any]:
    made: list[web.AppRunner] = []

    async def make(**kwargs: Any) -> ExampleReceiver:
        app = example_receiver.build_app(SECRET, **kwargs)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        made.append(runner)
        return ExampleReceiver(app, runner)

    yield make
    for runner in made:
        await runner.cleanup()


async def submit(
    agent: RunningAgent, webhook_url: str, prospects: list[str] = PROSPECTS, **extra: Any
) -> str:
    body = {
        "prospects": [{"email": e} for e in prospects],
        "criteria": {"min_company_size": 50, "industry": "tech"},
        "webhook_url": webhook_url,
        **extra,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{agent.url}/api/v1/lead-qualification", json=body) as resp,
    ):
        assert resp.status == 202, await resp.text()
        job_id: str = (await resp.json())["job_id"]
        return job_id


async def get_job(agent: RunningAgent, job_id: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{agent.url}/api/v1/jobs/{job_id}") as resp,
    ):
        assert resp.status == 200
        job: dict[str, Any] = await resp.json()
        return job


def _iso(value: str) -> datetime.datetime:
    assert value.endswith("Z")
    parsed = datetime.datetime.fromisoformat(value)
    assert parsed.tzinfo is not None
    return parsed


def _final(events: list[dict[str, Any]]) -> bool:
    return any(e["event"] in (steps.EVENT_COMPLETE, steps.EVENT_FAILED) for e in events)


async def test_job_sends_progress_then_complete(
    start_agent: Any, start_dispatcher: Any, make_example_receiver: Any, pool: Any
) -> None:
    await start_dispatcher()
    agent = await start_agent()
    receiver = await make_example_receiver()
    job_id = await submit(agent, receiver.url)

    await support.wait_for(lambda: _final(receiver.for_job(job_id)), message="COMPLETE webhook")
    events = receiver.for_job(job_id)
    assert [(e["event"], e["status"]) for e in events] == [
        (steps.EVENT_PROGRESS, "DATA_ENRICHMENT_COMPLETE"),
        (steps.EVENT_PROGRESS, "CRITERIA_CHECK_COMPLETE"),
        (steps.EVENT_COMPLETE, "COMPLETE"),
    ]
    enriched, checked, complete = events
    assert enriched["progress"] == {"current_step": "Enriching Data", "percentage": 50}
    assert enriched["enriched_data_sample"][0] == {
        "email": "ana@stripe.com",
        "company_size": 8000,
        "industry": "Software",
    }
    assert len(enriched["enriched_data_sample"]) == steps.SAMPLE_SIZE
    assert checked["progress"] == {"current_step": "Checking Criteria", "percentage": 75}
    assert checked["criteria_summary"] == {"prospects": 4, "qualified": 2}
    stamps = [_iso(e["timestamp"]) for e in events]
    assert stamps == sorted(stamps)
    results = {r["email"]: r for r in complete["results"]}
    assert set(results) == set(PROSPECTS)
    assert set(results["ana@stripe.com"]) == {
        "email",
        "company_size",
        "industry",
        "qualified",
        "score",
    }
    assert results["ana@stripe.com"]["qualified"] is True
    assert results["raj@acme.io"]["qualified"] is True
    assert results["lee@dundermifflin.com"]["qualified"] is False  # 30 people, Retail
    assert results["kim@globex.com"]["qualified"] is False  # Manufacturing is not tech
    assert all(0 <= r["score"] <= 100 for r in results.values())
    assert min(r["score"] for r in results.values() if r["qualified"]) >= 90

    # Both schemes were verified by the example receiver, and webhook-id is the stable id.
    recorded = [e for e in receiver.events if e["event"]["job_id"] == job_id]
    assert all(e["verified"] == {"standard_webhooks": True, "body_hmac": True} for e in recorded)
    assert [e["webhook_id"] for e in recorded] == [
        f"{job_id}:enrichment",
        f"{job_id}:criteria",
        f"{job_id}:scoring",
    ]

    job = await get_job(agent, job_id)
    assert job["status"] == "COMPLETE"
    assert job["progress"] == {"current_step": "Scoring", "percentage": 100}
    assert job["results"] == complete["results"]
    assert job["finished_at"] is not None
    outbox = await pool.fetch(
        "SELECT event_type, ordering_key FROM webhook_outbox ORDER BY id",
    )
    assert [r["ordering_key"] for r in outbox] == [job_id] * 3


async def test_unenrichable_prospect_fails_the_job(
    start_agent: Any, start_dispatcher: Any, make_example_receiver: Any
) -> None:
    await start_dispatcher()
    agent = await start_agent()
    receiver = await make_example_receiver()
    job_id = await submit(agent, receiver.url, ["ana@stripe.com", "bob@shop.invalid"])

    await support.wait_for(lambda: _final(receiver.for_job(job_id)), message="FAILED webhook")
    [failed] = receiver.for_job(job_id)
    assert failed["event"] == steps.EVENT_FAILED
    assert failed["status"] == "FAILED"
    assert failed["failed_step"] == "Enriching Data"
    assert "bob@shop.invalid" in failed["reason"]
    _iso(failed["timestamp"])
    job = await get_job(agent, job_id)
    assert job["status"] == "FAILED"
    assert job["error"] == failed["reason"]


async def test_rolled_back_business_transaction_publishes_nothing(pool: Any) -> None:
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await dispatcher.publish(conn, "order.created", {"id": 1}, event_id="ord-1")
        # The business change after the publish fails: the whole transaction goes.
        await tx.rollback()
        assert await conn.fetchval("SELECT count(*) FROM webhook_outbox") == 0
        async with conn.transaction():
            await dispatcher.publish(conn, "order.created", {"id": 1}, event_id="ord-1")
        # The same event id again is refused: a retried producer cannot publish twice.
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await dispatcher.publish(conn, "order.created", {"id": 1}, event_id="ord-1")
        assert await conn.fetchval("SELECT count(*) FROM webhook_outbox") == 1


async def test_failed_step_commit_leaves_no_event_and_is_retried(
    start_agent: Any, start_dispatcher: Any, make_example_receiver: Any, pool: Any
) -> None:
    """The criteria step's UPDATE fails after its publish ran: the transaction rolls back, so
    neither the state nor the event exists; once the fault is gone the job resumes there."""
    await pool.execute(
        """
        CREATE FUNCTION refuse_criteria() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.status = 'CRITERIA_CHECK_COMPLETE' THEN
                RAISE EXCEPTION 'injected fault';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_criteria BEFORE UPDATE ON agent_jobs
            FOR EACH ROW EXECUTE FUNCTION refuse_criteria();
        """
    )
    await start_dispatcher()
    agent = await start_agent(max_runs=1000, poll_interval_seconds=0.1)
    receiver = await make_example_receiver()
    job_id = await submit(agent, receiver.url)

    await support.wait_for(
        lambda: pool.fetchval("SELECT runs >= 2 FROM agent_jobs WHERE id = $1", job_id),
        message="a second run after the injected fault",
    )
    job = await pool.fetchrow("SELECT status, step FROM agent_jobs WHERE id = $1", job_id)
    assert (job["status"], job["step"]) == ("DATA_ENRICHMENT_COMPLETE", 1)
    ids = [r["event_id"] for r in await pool.fetch("SELECT event_id FROM webhook_outbox")]
    assert ids == [f"{job_id}:enrichment"]

    await pool.execute("DROP TRIGGER refuse_criteria ON agent_jobs")
    await support.wait_for(lambda: _final(receiver.for_job(job_id)), message="COMPLETE webhook")
    assert [e["status"] for e in receiver.for_job(job_id)] == [
        "DATA_ENRICHMENT_COMPLETE",
        "CRITERIA_CHECK_COMPLETE",
        "COMPLETE",
    ]
    counts = await pool.fetch(
        "SELECT event_id, count(*) AS n FROM webhook_outbox GROUP BY event_id ORDER BY 1"
    )
    assert [r["n"] for r in counts] == [1, 1, 1]


async def test_two_agents_never_run_the_same_job(
    start_agent: Any, start_dispatcher: Any, make_example_receiver: Any, pool: Any
) -> None:
    # Enough attempts that the flaky receiver never pushes a callback to dead, and no circuit
    # breaker: this test is about ordering and claiming, not about pausing a bad endpoint.
    await start_dispatcher(
        retry=config.RetryPolicy(base_seconds=0.01, cap_seconds=0.05),
        endpoint_health=config.EndpointHealthPolicy(breaker_failure_ratio=0.0),
    )
    # A small step delay keeps jobs in progress long enough for both runners to compete.
    agents = [
        await start_agent(step_delay_seconds=0.02, concurrency=3),
        await start_agent(step_delay_seconds=0.02, concurrency=3),
    ]
    receiver = await make_example_receiver(fail_ratio=0.3, seed=7)
    jobs = await asyncio.gather(
        *(submit(agents[i % 2], receiver.url) for i in range(8)),
    )

    def all_final() -> bool:
        return all(_final(receiver.for_job(j)) for j in jobs)

    await support.wait_for(all_final, timeout=20, message="every job's final webhook")
    for job_id in jobs:
        statuses = [e["status"] for e in receiver.for_job(job_id)]
        assert statuses == ["DATA_ENRICHMENT_COMPLETE", "CRITERIA_CHECK_COMPLETE", "COMPLETE"]
    rows = await pool.fetch("SELECT runs, last_worker FROM agent_jobs")
    assert [r["runs"] for r in rows] == [1] * len(jobs)
    assert {r["last_worker"] for r in rows} == {a.agent.settings.worker_id for a in agents}
    assert receiver.app[example_receiver.STATS]["injected_failures"] > 0


async def test_stopping_mid_job_resumes_at_the_next_step(
    start_agent: Any, start_dispatcher: Any, make_example_receiver: Any, pool: Any
) -> None:
    await start_dispatcher()
    slow = await start_agent(step_delay_seconds=0.3)
    receiver = await make_example_receiver()
    job_id = await submit(slow, receiver.url)
    await support.wait_for(
        lambda: pool.fetchval("SELECT step = 1 FROM agent_jobs WHERE id = $1", job_id),
        message="the first step",
    )
    await slow.stop()  # graceful: the runner stops between steps and lets go of the job
    assert await pool.fetchval("SELECT step FROM agent_jobs WHERE id = $1", job_id) == 1

    await start_agent()
    await support.wait_for(lambda: _final(receiver.for_job(job_id)), message="COMPLETE webhook")
    assert [e["webhook_id"] for e in receiver.events] == [
        f"{job_id}:enrichment",
        f"{job_id}:criteria",
        f"{job_id}:scoring",
    ]
    assert await pool.fetchval("SELECT runs FROM agent_jobs WHERE id = $1", job_id) == 2


def test_enrichment_is_deterministic_offline() -> None:
    known = enrichment.lookup("Stripe.com")
    assert (known.company_size, known.industry, known.source) == (8000, "Software", "table")
    guess = enrichment.lookup("northwind-labs.dev")
    assert guess.source == "estimate"
    assert enrichment.lookup("northwind-labs.dev") == guess
    # Fixed values: the fallback must not depend on PYTHONHASHSEED or the process.
    assert (guess.company_size, guess.industry) == (45, "Education")
    with pytest.raises(enrichment.EnrichmentError):
        enrichment.lookup("shop.invalid")
    assert enrichment.industry_matches("Cloud", "tech")
    assert enrichment.industry_matches("Retail", "RETAIL")
    assert not enrichment.industry_matches("Retail", "tech")
    assert enrichment.industry_matches("Retail", None)
