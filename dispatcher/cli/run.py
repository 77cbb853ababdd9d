"""Commands that run something: ``migrate``, ``run``, ``agent`` and ``demo``.

Each receives the parsed arguments and the ``Context``; the processes they start are built by
their composition roots (``dispatcher.app``, ``dispatcher.agent.app``), imported only when the
command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from dispatcher.cli import context


def install_signal_handlers(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: drain and stop. Second: exit at once (leases expire and the
    work is picked up again, so nothing is lost)."""
    loop = asyncio.get_running_loop()
    seen = {"count": 0}

    def handle() -> None:
        seen["count"] += 1
        if seen["count"] > 1:
            os._exit(130)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle)


def cmd_migrate(args: argparse.Namespace, ctx: context.Context) -> int:
    from dispatcher import app  # noqa: PLC0415

    with ctx.database() as dsn:
        applied = context.run(app.migrate_database(dsn))
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def _serve(process: Any) -> None:
    """Run ``process.run(stop)`` until a signal; a schema that is not ready is a CLI error."""
    from dispatcher.db import migrate  # noqa: PLC0415

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await process.run(stop)

    try:
        context.run(main())
    except migrate.SchemaNotReady as exc:
        raise context.CliError(str(exc)) from None


def cmd_run(args: argparse.Namespace, ctx: context.Context) -> int:
    from dispatcher import app  # noqa: PLC0415

    with ctx.database() as dsn:
        settings = ctx.settings(dsn)
        if args.migrate:
            context.run(app.migrate_database(dsn))
        _serve(app.Dispatcher(settings))
    return 0


def cmd_agent(args: argparse.Namespace, ctx: context.Context) -> int:
    from dispatcher import app  # noqa: PLC0415
    from dispatcher.agent import app as agent_app  # noqa: PLC0415

    with ctx.database() as dsn:
        settings = ctx.agent_settings(dsn)
        if args.migrate:
            from dispatcher.agent import store  # noqa: PLC0415

            context.run(app.migrate_database(dsn, store.MIGRATIONS))
        _serve(agent_app.Agent(settings))
    return 0


def cmd_demo(args: argparse.Namespace, ctx: context.Context) -> int:
    from dispatcher import demo  # noqa: PLC0415

    with ctx.database() as dsn:
        return int(context.run(demo.run(dsn, env=ctx.env)))


def add_commands(sub: Any) -> None:
    p = sub.add_parser("migrate", help="apply database migrations (idempotent)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("run", help="run the dispatcher (admin API on DISPATCHER_LISTEN)")
    p.add_argument("--migrate", action="store_true", help="apply migrations before starting")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("agent", help="run the reference lead-qualification agent (AGENT_LISTEN)")
    p.add_argument(
        "--migrate",
        action="store_true",
        help="apply the agent's own migrations (its job table) before starting, then run; "
        "the dispatcher's schema stays with `dispatcher migrate`",
    )
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("demo", help="the whole story end to end on the embedded Postgres")
    p.set_defaults(func=cmd_demo)
