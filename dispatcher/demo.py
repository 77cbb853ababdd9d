"""``dispatcher demo``: the lead-qualification story end to end, on the database the CLI chose.

Migrates, starts the real ``dispatcher run`` and ``dispatcher agent`` as child processes and a
verifying example receiver in this process, submits one job, prints every webhook as it
arrives (the receiver fails the first one on purpose, so a retry shows too), prints the final
results table and shuts everything down. The children's logs go to files so the terminal
shows only the story. It must not touch anything but 127.0.0.1 and the given database.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
from aiohttp import web

from dispatcher import app, ports, signing
from dispatcher.examples import receiver as example_receiver

PROSPECTS = (
    "ana@stripe.com",
    "raj@acme.io",
    "lee@dundermifflin.com",
    "kim@globex.com",
    "sam@northwind-labs.dev",
)
CRITERIA = {"min_company_size": 50, "industry": "tech"}
CALLBACK_PATH = "/agent-callbacks/lead-status"
# A share of callbacks fail on purpose; this seed makes exactly the first attempt fail, so
# the retry (and the ordering it preserves) is visible every run.
FAIL_RATIO = 0.25
FAIL_SEED = 67
START_DEADLINE_SECONDS = 20.0
JOB_DEADLINE_SECONDS = 30.0
STOP_GRACE_SECONDS = 10.0
FINAL_EVENTS = ("LEAD_QUALIFICATION_COMPLETE", "LEAD_QUALIFICATION_FAILED")


class DemoError(RuntimeError):
    """Something in the demo did not come up or finish in time."""


def _say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _child_env(env: Mapping[str, str], dsn: str, extra: Mapping[str, str]) -> dict[str, str]:
    # The demo decides the settings of its children; a user's own DISPATCHER_*/AGENT_*
    # values are for their real deployment, not this.
    out = {k: v for k, v in env.items() if not k.startswith(("DISPATCHER_", "AGENT_"))}
    out.update(
        {
            "DATABASE_URL": dsn,
            "DISPATCHER_ALLOW_CIDRS": "127.0.0.1/32",
            "DISPATCHER_LOG_LEVEL": "info",
            "DISPATCHER_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
    )
    out.update(extra)
    return out


class Child:
    """A ``python -m dispatcher …`` child whose output goes to a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    async def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dispatcher",
            *self.args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
        )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def stop(self) -> str:
        """SIGTERM, wait for the drain, SIGKILL only past the grace period."""
        try:
            if self.proc is None:
                return "not started"
            if self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), STOP_GRACE_SECONDS)
                except TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()
                    return "killed after the grace period"
            code = self.proc.returncode
            return "stopped" if code in (0, -signal.SIGTERM) else f"exited with {code}"
        finally:
            if self._log is not None:
                self._log.close()

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("      " + line for line in text.splitlines()[-lines:])


async def _until(
    condition: Callable[[], Awaitable[bool]], deadline_seconds: float, what: str
) -> None:
    deadline = time.monotonic() + deadline_seconds
    while not await condition():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {deadline_seconds:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)  # poll interval


def _results_table(results: list[dict[str, Any]]) -> list[str]:
    width = max(len("EMAIL"), *(len(str(r["email"])) for r in results))
    rows = [
        f"    {'EMAIL':<{width}}  {'COMPANY SIZE':>12}  {'INDUSTRY':<24}  {'QUALIFIED':<9}  SCORE"
    ]
    for r in results:
        rows.append(
            f"    {r['email']:<{width}}  {r['company_size']:>12,}  {r['industry']:<24}  "
            f"{('yes' if r['qualified'] else 'no'):<9}  {r['score']:>5}"
        )
    return rows


async def run(dsn: str, *, env: Mapping[str, str]) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        # A terminal without UTF-8 gets '?' for ✓ rather than a crash.
        sys.stdout.reconfigure(errors="replace")
    started = time.monotonic()
    try:
        return await _story(dsn, env, started)
    except DemoError as exc:
        _say(f"\n✗ demo failed: {exc}")
        return 1
    finally:
        _say(f"\ndone in {time.monotonic() - started:.1f}s")


async def _story(dsn: str, env: Mapping[str, str], started: float) -> int:
    def clock() -> str:
        return f"{time.monotonic() - started:5.2f}s"

    _say("dispatcher demo: a lead-qualification job, its signed callbacks, end to end\n")
    where = "DATABASE_URL" if env.get("DATABASE_URL") else "embedded Postgres"
    applied = await app.migrate_database(dsn)
    if applied:
        names = [name.removesuffix(".sql") for name in applied]
        schema = f"{len(applied)} migrations applied ({names[0]} … {names[-1]})"
    else:
        schema = "schema already current"
    _say(f"▶ database    {where}, {schema}")

    secret = signing.generate_secret()
    finals: list[dict[str, Any]] = []
    final_arrived = asyncio.Event()

    async def on_event(payload: dict[str, Any], headers: Mapping[str, str]) -> None:
        progress = payload.get("progress") or {}
        pct = progress.get("percentage")
        _say(
            f"  {clock()}  ✓ verified  {payload.get('event', '-'):<28} "
            f"{payload.get('status', '-'):<25} {'' if pct is None else f'{pct:>3}%'}  "
            f"webhook-id {headers.get('webhook-id', '-')}"
        )
        if payload.get("event") in FINAL_EVENTS:
            finals.append(payload)
            final_arrived.set()

    @web.middleware
    async def show_refusals(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if response.status >= 500 and request.method == "POST":
            _say(
                f"  {clock()}  ✗ receiver answered {response.status} on purpose "
                "(flaky endpoint); the dispatcher retries, later events wait their turn"
            )
        return response

    receiver_app = example_receiver.build_app(
        secret, on_event=on_event, fail_ratio=FAIL_RATIO, seed=FAIL_SEED
    )
    receiver_app.middlewares.append(show_refusals)
    receiver = web.AppRunner(receiver_app, access_log=None)
    await receiver.setup()
    site = web.TCPSite(receiver, "127.0.0.1", 0)
    await site.start()
    callback_url = f"http://127.0.0.1:{receiver.addresses[0][1]}{CALLBACK_PATH}"
    _say(f"▶ receiver    {callback_url}  (checks webhook-signature and X-AgentX-Signature)")

    logs = Path(env.get("DISPATCHER_PGDATA") or ".dispatcher/pgdata").parent / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)
    agent_port = ports.free_port()
    children = [
        Child(
            "dispatcher",
            ["run"],
            _child_env(
                env,
                dsn,
                {
                    "DISPATCHER_LISTEN": "127.0.0.1:0",
                    "DISPATCHER_POLL_INTERVAL": "0.2",
                    "DISPATCHER_RETRY_BASE": "0.3",
                    "DISPATCHER_RETRY_CAP": "1",
                    "DISPATCHER_SHUTDOWN_GRACE": "5",
                },
            ),
            logs / "dispatcher.log",
        ),
        Child(
            "agent",
            ["agent", "--migrate"],
            _child_env(
                env,
                dsn,
                {
                    "AGENT_LISTEN": f"127.0.0.1:{agent_port}",
                    "AGENT_WEBHOOK_SECRET": secret,
                    "AGENT_STEP_DELAY": "0.5",
                },
            ),
            logs / "agent.log",
        ),
    ]
    agent_url = f"http://127.0.0.1:{agent_port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for child in children:
                await child.start()
            await _wait_started(http, children, agent_url)
            dispatcher_pid = children[0].proc.pid if children[0].proc else "?"
            agent_pid = children[1].proc.pid if children[1].proc else "?"
            _say(f"▶ dispatcher  `dispatcher run` (pid {dispatcher_pid})")
            _say(f"▶ agent       `dispatcher agent` on {agent_url} (pid {agent_pid})\n")

            request = {
                "prospects": [{"email": e} for e in PROSPECTS],
                "criteria": CRITERIA,
                "webhook_url": callback_url,
            }
            _say(
                f"POST {agent_url}/api/v1/lead-qualification  "
                f"({len(PROSPECTS)} prospects, criteria {orjson.dumps(CRITERIA).decode()})"
            )
            async with http.post(f"{agent_url}/api/v1/lead-qualification", json=request) as resp:
                accepted = await resp.json()
                if resp.status != 202:
                    raise DemoError(f"agent answered {resp.status}: {accepted}")
            job_id = accepted["job_id"]
            _say(f"  {clock()}  ← {resp.status} Accepted  {orjson.dumps(accepted).decode()}\n")
            _say("webhooks as they arrive at the receiver:")

            async def finished() -> bool:
                for child in children:
                    if child.exited() is not None:
                        raise DemoError(
                            f"{child.name} exited with {child.exited()}; its log:\n{child.tail()}"
                        )
                return final_arrived.is_set()

            await _until(finished, JOB_DEADLINE_SECONDS, f"the final webhook of {job_id}")
            final = finals[0]
            async with http.get(f"{agent_url}/api/v1/jobs/{job_id}") as resp:
                polled = await resp.json()
            ok = _report(job_id, final, polled)
    finally:
        _say("\n▶ shutting down")
        for child in reversed(children):
            _say(f"  {child.name:<10}  {await child.stop()}")
        await receiver.cleanup()
        _say(f"  {'receiver':<10}  stopped   (child logs: {logs})")
    return 0 if ok else 1


def _report(job_id: str, final: dict[str, Any], polled: dict[str, Any]) -> bool:
    if final["event"] != "LEAD_QUALIFICATION_COMPLETE":
        raise DemoError(f"job {job_id} failed: {final.get('reason')}")
    _say(f"\nresults of {job_id} (from the COMPLETE webhook):")
    for line in _results_table(final["results"]):
        _say(line)
    qualified = sum(1 for r in final["results"] if r["qualified"])
    same = bool(polled.get("results") == final["results"])
    _say(
        f"\n{qualified} of {len(final['results'])} prospects qualified. "
        f"GET /api/v1/jobs/{job_id} → {polled.get('status')} "
        f"({'matches the webhook' if same else 'DIFFERS from the webhook'})"
    )
    return same


async def _wait_started(http: aiohttp.ClientSession, children: list[Child], agent_url: str) -> None:
    async def agent_up() -> bool:
        for child in children:
            if child.exited() is not None:
                raise DemoError(
                    f"{child.name} exited with {child.exited()} while starting; its log:\n"
                    f"{child.tail()}"
                )
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(f"{agent_url}/readyz") as resp:
                return resp.status == 200
        return False

    await _until(agent_up, START_DEADLINE_SECONDS, "the agent to start")
