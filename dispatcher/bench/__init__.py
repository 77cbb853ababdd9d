"""``dispatcher bench``: measure this machine's ceiling and how close the dispatcher gets to it.

Every run works in a fresh database created on the chosen server (``DATABASE_URL`` or the
embedded Postgres) and dropped at the end, sends traffic only to a receiver process it starts
on 127.0.0.1 (``dispatcher.bench.receiver``), and bounds every scenario in requests and time.
The dispatcher under test is the real one — ``python -m dispatcher run`` in its own process,
every feature on — so its CPU and memory are measured from ``/proc`` as its own.

Scenarios: ceiling (raw aiohttp POSTs, no database), baseline (a deliberately naive
claim → sign → gather → mark-done loop), throughput, shapes (one capped subscriber, many small
ones: dispatcher vs the naive loop at equal concurrency), peer (pgqueuer + aiohttp), scaling
(N processes), latency, isolation, backlog, footprint, idle (active subscriptions beside many
idle ones). Absolute numbers move with the machine and its load; the ratios between scenarios
of one run are what to compare.

This package never changes the dispatcher's code paths or settings beyond what its CLI
exposes, and never reads the environment itself (the CLI hands it ``env``). Its API is
``add_arguments``, ``options_from_args`` and ``run``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

from dispatcher import __version__
from dispatcher.bench import (
    core,
    database,
    idle,
    latency,
    measure,
    peer,
    procs,
    report,
    resilience,
    throughput,
)
from dispatcher.bench.options import SCENARIOS, Options, add_arguments, options_from_args
from dispatcher.bench.report import render

__all__ = ["SCENARIOS", "Options", "add_arguments", "options_from_args", "render", "run"]


def _steps(b: core.Bench) -> dict[str, Callable[[], Awaitable[dict[str, Any]]]]:
    return {
        "ceiling": lambda: throughput.ceiling(b),
        "baseline": lambda: throughput.baseline(b),
        "throughput": lambda: throughput.throughput(b),
        "shapes": lambda: throughput.shapes(b),
        "peer": lambda: peer.peer(b),
        "scaling": lambda: throughput.throughput(b, b.o.processes, "scaling"),
        "latency": lambda: latency.latency(b),
        "isolation": lambda: resilience.isolation(b),
        "backlog": lambda: resilience.backlog(b),
        "footprint": lambda: resilience.footprint(b),
        "idle": lambda: idle.idle(b),
    }


async def run(options: Options, server_dsn: str, *, env: Mapping[str, str]) -> int:
    say = measure.Progress()
    unknown = set(options.scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios: {', '.join(sorted(unknown))}")
    db = database.BenchDb(server_dsn, say)
    receiver = procs.ReceiverProcess(env)
    say(f"creating database {db.name}")
    await db.create()
    out: dict[str, Any] = {"version": __version__}
    bench: core.Bench | None = None
    try:
        receiver.start()
        say(f"receiver on 127.0.0.1:{receiver.port} (pid {receiver.pid})")
        bench = core.Bench(options, db, receiver, env, say)
        out["machine"] = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": db.server_version,
            "receiver": "raw asyncio protocol (dispatcher.bench.receiver), own process",
        }
        out["options"] = dataclasses.asdict(options)
        steps = _steps(bench)
        for name in SCENARIOS:
            if name not in options.scenarios:
                continue
            say(f"{name} …")
            out[name] = await steps[name]()
            say(f"{name}: {report.summary(out[name])}")
    finally:
        if bench is not None:
            await bench.close()
        await receiver.stop()
        say(f"dropping database {db.name}")
        await db.drop()
    out["ratios"] = report.ratios(out)
    out["targets"] = report.targets(out)
    if options.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render(out) + "\n")
    sys.stdout.flush()
    return 0
