"""The ``dispatcher`` command line: the parser, ``main``, and the one read of ``os.environ``.

Commands live by purpose in ``run`` (migrate/run/agent/demo), ``manage`` (subscriptions,
deliveries, events), ``secrets`` and ``bench``; each receives its parsed arguments and a
``context.Context`` holding the environment parsed once through the settings table
(``settings``). Every subcommand resolves the database the same way: ``DATABASE_URL`` when
set, otherwise an embedded Postgres under ``DISPATCHER_PGDATA``, started on demand and stopped
when the command exits.

Building the parser imports nothing heavy: aiohttp, the database driver and the benchmark
load only when a command that needs them runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from dispatcher import __version__, logs, validation
from dispatcher.cli import bench, context, manage, run, secrets

DESCRIPTION = (
    "Outbound webhook dispatcher: your app writes events into a Postgres outbox table; "
    "dispatcher routes them to subscriptions, signs, delivers with retries and backoff, "
    "dead-letters and replays. Configure it with environment variables "
    "(see docs/configuration.md)."
)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command line, the benchmark's options are loaded only when
    it runs ``bench``."""
    parser = argparse.ArgumentParser(prog="dispatcher", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"dispatcher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_commands(sub)
    positional = [a for a in argv or () if not a.startswith("-")]
    bench.add_command(sub, with_options=argv is None or positional[:1] == [bench.NAME])
    manage.add_commands(sub)
    secrets.add_commands(sub)
    return parser


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        ctx = context.Context.from_env(env)
        log = ctx.log_settings()
        logs.configure(level=log.level, fmt=log.format)
        result: int = args.func(args, ctx)
        return result
    except context.CliError as exc:
        print(f"dispatcher: error: {exc}", file=sys.stderr)
        return 2
    except validation.ValidationError as exc:
        print(f"dispatcher: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"dispatcher: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
