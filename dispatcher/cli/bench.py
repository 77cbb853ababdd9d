"""``dispatcher bench``: the command's wiring only; the benchmark lives in ``dispatcher.bench``.

The benchmark's options are added to the parser only when ``bench`` is the command being run,
so ``dispatcher --help`` and every other command never import it.
"""

from __future__ import annotations

import argparse
from typing import Any

from dispatcher.cli import context

NAME = "bench"


def cmd_bench(args: argparse.Namespace, ctx: context.Context) -> int:
    from dispatcher import bench  # noqa: PLC0415

    options = bench.options_from_args(args)
    with ctx.database() as dsn:
        return int(context.run(bench.run(options, dsn, env=ctx.env)))


def add_command(sub: Any, *, with_options: bool) -> None:
    p = sub.add_parser(NAME, help="measure throughput, latency and footprint on this machine")
    p.set_defaults(func=cmd_bench)
    if with_options:
        from dispatcher import bench  # noqa: PLC0415 (heavy: only when bench runs)

        bench.add_arguments(p)
