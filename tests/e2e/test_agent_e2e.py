"""The real thing: `dispatcher agent`, `dispatcher run` and receivers as separate processes on
one database. Callbacks are verified the way a caller would (a plain hmac body check and
the `standardwebhooks` library), arrive in order even from a flaky endpoint, and an agent
killed between steps resumes without the caller seeing any event twice."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import standardwebhooks

from dispatcher import ports, signing
from tests import support

SECRET = signing.generate_secret()
PROSPECTS = ["ana@stripe.com", "raj@acme.io", "lee@dundermifflin.com"]
ORDER = ["DATA_ENRICHMENT_COMPLETE", "CRITERIA_CHECK_COMPLETE", "COMPLETE"]


def verify_webhook_signature(secret: str, payload_raw: bytes, signature_header: str) -> bool:
    """A body-HMAC receiver check as a caller would write it."""
    expected_signature = hmac.new(secret.encode("utf-8"), payload_raw, hashlib.sha256).hexdigest()
    if signature_header.startswith("sha256="):
        signature_header = signature_header[len("sha256=") :]
    return hmac.compare_digest(expected_signature, signature_header)


class Processes:
    """Child processes of one test; all are stopped (SIGKILL at worst) at the end."""

    def __init__(self, dsn: str, logs: Path) -> None:
        self.dsn = dsn
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def dispatcher(self) -> subprocess.Popen[bytes]:
        # The receivers fail on purpose; the circuit breaker would pause them for 30 s.
        proc = support.spawn_dispatcher(
            self.dsn,
            extra_env={"DISPATCHER_BREAKER_RATIO": "0"},
            log_path=self.logs / "dispatcher.log",
        )
        self.procs.append(proc)
        return proc

    async def agent(self, step_delay: float, name: str = "agent") -> tuple[Any, str]:
        port = ports.free_port()
        proc = support.spawn_dispatcher(
            self.dsn,
            args=("agent",),
            extra_env={
                "AGENT_LISTEN": f"127.0.0.1:{port}",
                "AGENT_WEBHOOK_SECRET": SECRET,
                "AGENT_STEP_DELAY": str(step_delay),
                "AGENT_POLL_INTERVAL": "0.1",
            },
            log_path=self.logs / f"{name}.log",
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(proc, url + "/readyz", self.logs / f"{name}.log")
        return proc, url

    async def example_receiver(self, fail_ratio: float, seed: int) -> str:
        port = ports.free_port()
        proc = _spawn_example_receiver(port, fail_ratio, seed)
        self.procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        await _wait_ready(proc, base + "/stats", None)
        return base

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _spawn_example_receiver(port: int, fail_ratio: float, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dispatcher.examples.receiver",
            "--listen",
            f"127.0.0.1:{port}",
            "--secret",
            SECRET,
            "--fail-ratio",
            str(fail_ratio),
            "--seed",
            str(seed),
        ],
        cwd=support.ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _tail(log: Path | None) -> str:
    return log.read_text()[-2000:] if log is not None and log.exists() else ""


async def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path | None) -> None:
    async with aiohttp.ClientSession() as http:

        async def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{url} process exited {proc.returncode}: {_tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url) as resp:
                    return resp.status == 200
            return False

        await support.wait_for(up, timeout=20, message=url)


@pytest.fixture
def procs(dsn: str, tmp_path: Path) -> Iterator[Processes]:
    p = Processes(dsn, tmp_path)
    yield p
    p.stop_all()


@pytest.fixture
async def flaky_receiver() -> AsyncIterator[support.Receiver]:
    r = await support.Receiver().start()
    rng = random.Random(11)
    # A third of the attempts fail; the dispatcher retries them.
    r.respond = lambda _n, _h, _b: (500 if rng.random() < 0.33 else 200, {}, 0.0)
    yield r
    await r.stop()


async def submit(agent_url: str, webhook_url: str) -> str:
    body = {
        "prospects": [{"email": e} for e in PROSPECTS],
        "criteria": {"min_company_size": 50, "industry": "tech"},
        "webhook_url": webhook_url,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{agent_url}/api/v1/lead-qualification", json=body) as resp,
    ):
        assert resp.status == 202, await resp.text()
        job_id: str = (await resp.json())["job_id"]
        return job_id


def delivered(receiver: support.Receiver, job_id: str) -> list[support.Received]:
    return [r for r in receiver.ok() if json.loads(r.body)["job_id"] == job_id]


def complete(receiver: support.Receiver, job_id: str) -> bool:
    return any(json.loads(r.body)["status"] == "COMPLETE" for r in delivered(receiver, job_id))


def check_caller_view(receiver: support.Receiver, job_id: str) -> None:
    """What a caller verifying every request would accept, in order, once per webhook-id."""
    accepted = delivered(receiver, job_id)
    wh = standardwebhooks.Webhook(SECRET)
    for req in accepted:
        assert verify_webhook_signature(SECRET, req.body, req.headers["x-agentx-signature"])
        assert wh.verify(req.body, req.headers)["job_id"] == job_id
    assert [json.loads(r.body)["status"] for r in accepted] == ORDER
    ids = [r.headers["webhook-id"] for r in accepted]
    assert ids == [f"{job_id}:enrichment", f"{job_id}:criteria", f"{job_id}:scoring"]
    # Every attempt for this job, failed ones included, followed the order: a later event was
    # never tried before the earlier one had been delivered.
    attempts = [
        r.headers["webhook-id"] for r in receiver.requests if json.loads(r.body)["job_id"] == job_id
    ]
    assert attempts == sorted(attempts, key=ids.index)


async def test_signed_ordered_callbacks_across_processes(
    procs: Processes, flaky_receiver: support.Receiver
) -> None:
    procs.dispatcher()
    _agent, agent_url = await procs.agent(step_delay=0.0)
    example_url = await procs.example_receiver(fail_ratio=0.3, seed=5)

    jobs = [await submit(agent_url, flaky_receiver.url) for _ in range(3)]
    example_job = await submit(agent_url, example_url + "/agent-callbacks/lead-status")

    await support.wait_for(
        lambda: all(complete(flaky_receiver, j) for j in jobs),
        timeout=20,
        message="COMPLETE for every job",
    )
    for job_id in jobs:
        check_caller_view(flaky_receiver, job_id)
    assert any(r.status == 500 for r in flaky_receiver.requests), "the receiver never failed"

    async with aiohttp.ClientSession() as http:

        async def example_events() -> list[dict[str, Any]]:
            async with http.get(example_url + "/events") as resp:
                events: list[dict[str, Any]] = await resp.json()
            mine = [e for e in events if e["event"]["job_id"] == example_job]
            return mine if len(mine) == 3 else []

        events = await support.wait_for(example_events, timeout=20, message="example receiver")
        assert [e["event"]["status"] for e in events] == ORDER
        assert all(e["verified"] == {"standard_webhooks": True, "body_hmac": True} for e in events)

        async with http.get(f"{agent_url}/api/v1/jobs/{example_job}") as resp:
            shown = await resp.json()
        assert shown["status"] == "COMPLETE"
        assert shown["results"] == events[-1]["event"]["results"]


async def test_agent_killed_between_steps_resumes_without_duplicates(
    procs: Processes, receiver: support.Receiver, dsn: str
) -> None:
    procs.dispatcher()
    # A long pause before each step, so the kill lands while step 2 is waiting.
    agent, agent_url = await procs.agent(step_delay=1.0, name="agent-1")
    job_id = await submit(agent_url, receiver.url)
    conn = await asyncpg.connect(dsn)
    try:
        await support.wait_for(
            lambda: conn.fetchval("SELECT step = 1 FROM agent_jobs WHERE id = $1", job_id),
            timeout=15,
            message="the enrichment step to commit",
        )
        agent.kill()  # SIGKILL: no drain, no unlock; the server drops its session lock
        agent.wait(timeout=10)
        assert await conn.fetchval("SELECT step FROM agent_jobs WHERE id = $1", job_id) == 1

        _agent2, agent2_url = await procs.agent(step_delay=0.0, name="agent-2")
        await support.wait_for(lambda: complete(receiver, job_id), timeout=20, message="COMPLETE")
        check_caller_view(receiver, job_id)
        # Each event was delivered exactly once: no 2xx repeats a webhook-id.
        ids = [r.headers["webhook-id"] for r in receiver.ok()]
        assert len(ids) == len(set(ids)) == 3
        assert await conn.fetchval("SELECT runs FROM agent_jobs WHERE id = $1", job_id) == 2
        assert await conn.fetchval("SELECT count(*) FROM webhook_outbox") == 3
    finally:
        await conn.close()

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{agent2_url}/api/v1/jobs/{job_id}") as resp,
    ):
        shown = await resp.json()
    assert shown["status"] == "COMPLETE"
    assert [r["email"] for r in shown["results"]] == PROSPECTS


async def test_agent_refuses_to_start_without_a_secret(dsn: str, tmp_path: Path) -> None:
    proc = support.spawn_dispatcher(
        dsn,
        args=("agent",),
        extra_env={"AGENT_LISTEN": f"127.0.0.1:{ports.free_port()}"},
        log_path=tmp_path / "agent.log",
    )
    assert await asyncio.to_thread(proc.wait, 30) == 2
    text = (tmp_path / "agent.log").read_text()
    assert "AGENT_WEBHOOK_SECRET is not set" in text
    assert "whsec_" in text
