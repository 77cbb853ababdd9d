"""The bench's options: scenario names, sizes, and their ``dispatcher bench`` arguments.

Only parsing and defaults here; nothing runs.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

SCENARIOS = (
    "ceiling",
    "baseline",
    "throughput",
    "shapes",
    "peer",
    "scaling",
    "latency",
    "isolation",
    "backlog",
    "footprint",
    "idle",
)
SECRET = "whsec_" + base64.b64encode(b"dispatcher-bench-secret-0123456").decode()
SIGNATURE_HEADER = "X-Bench-Signature"
NAIVE_BATCH = 100


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    scenarios: tuple[str, ...] = SCENARIOS
    events: int = 20_000  # throughput, baseline and ceiling request count
    concurrency: int = 100  # requests on the wire per process (the naive loop's batch too)
    subscriptions: int = 4
    payload_bytes: int = 512
    processes: int = 2  # scaling: compared with the 1-process throughput
    latency_rate: float = 200.0
    latency_seconds: float = 10.0
    backlog_small: int = 10_000
    backlog_large: int = 1_000_000
    isolation_events: int = 20_000
    request_timeout_seconds: float = 2.0  # isolation: how long a blackholed request holds
    footprint_pending: int = 100_000
    footprint_seconds: float = 30.0  # bound on the drain measured for CPU per delivery
    idle_seconds: float = 10.0
    idle_active: int = 100  # idle: active subscriptions (cap 5) ...
    idle_idle: int = 9_900  # ... beside this many with no work
    idle_events: int = 10_000
    scenario_timeout_seconds: float = 120.0
    json: bool = False
    quick: bool = False
    # Extra DISPATCHER_* settings for the dispatcher under test (``--set NAME=VALUE``).
    dispatcher_env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def quick_run(cls, **changes: Any) -> Options:
        """A smoke run of a few seconds in all: proves every part works; the numbers mean
        little. Most of its time is dispatcher processes starting and stopping, so the sizes
        are just big enough for every figure to be non-zero, and a scenario waits for its
        processes to stop claiming rather than to exit (``Bench.retire``)."""
        base = cls(
            events=300,
            concurrency=50,
            latency_rate=100.0,
            latency_seconds=0.4,
            backlog_small=200,
            backlog_large=2_000,
            isolation_events=300,
            request_timeout_seconds=0.3,
            footprint_pending=300,
            footprint_seconds=15.0,
            idle_seconds=0.5,
            idle_active=10,
            idle_idle=200,
            idle_events=300,
            scenario_timeout_seconds=30.0,
            quick=True,
        )
        return dataclasses.replace(base, **changes)


def add_arguments(p: Any) -> None:
    """``dispatcher bench`` options (the CLI owns the parser; the defaults live here)."""
    d = Options()
    p.add_argument("--quick", action="store_true", help="smoke run: a few seconds per scenario")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only these scenarios (repeatable; default all)",
    )
    p.add_argument("--processes", type=int, help=f"scaling: dispatcher processes ({d.processes})")
    p.add_argument("--events", type=int, help=f"deliveries per throughput run ({d.events:,})")
    p.add_argument("--concurrency", type=int, help=f"requests in flight ({d.concurrency})")
    p.add_argument("--subscriptions", type=int, help=f"subscriptions ({d.subscriptions})")
    p.add_argument("--payload-bytes", type=int, help=f"event payload size ({d.payload_bytes})")
    p.add_argument("--latency-rate", type=float, help=f"events/s offered ({d.latency_rate:g})")
    p.add_argument("--latency-seconds", type=float, help=f"({d.latency_seconds:g})")
    p.add_argument("--backlog-small", type=int, help=f"pending rows ({d.backlog_small:,})")
    p.add_argument("--backlog-large", type=int, help=f"pending rows ({d.backlog_large:,})")
    p.add_argument("--footprint-pending", type=int, help=f"({d.footprint_pending:,})")
    p.add_argument("--isolation-events", type=int, help=f"({d.isolation_events:,})")
    p.add_argument(
        "--request-timeout",
        type=float,
        help=f"isolation: how long a blackholed request holds ({d.request_timeout_seconds:g} s)",
    )
    p.add_argument("--idle-seconds", type=float, help=f"idle CPU window ({d.idle_seconds:g})")
    p.add_argument(
        "--idle-subscriptions", type=int, help=f"idle: subscriptions with no work ({d.idle_idle:,})"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a DISPATCHER_* setting for the dispatcher under test (repeatable)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help=f"bound per scenario, seconds ({d.scenario_timeout_seconds:g})",
    )


def options_from_args(args: Any) -> Options:
    changes: dict[str, Any] = {"json": bool(args.json)}
    for arg, field in (
        ("processes", "processes"),
        ("events", "events"),
        ("concurrency", "concurrency"),
        ("subscriptions", "subscriptions"),
        ("payload_bytes", "payload_bytes"),
        ("latency_rate", "latency_rate"),
        ("latency_seconds", "latency_seconds"),
        ("backlog_small", "backlog_small"),
        ("backlog_large", "backlog_large"),
        ("footprint_pending", "footprint_pending"),
        ("isolation_events", "isolation_events"),
        ("request_timeout", "request_timeout_seconds"),
        ("idle_seconds", "idle_seconds"),
        ("idle_subscriptions", "idle_idle"),
        ("timeout", "scenario_timeout_seconds"),
    ):
        value = getattr(args, arg, None)
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{arg.replace('_', '-')} must be > 0")
            changes[field] = value
    if args.scenario:
        changes["scenarios"] = tuple(args.scenario)
    pairs = []
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("DISPATCHER_"):
            raise ValueError(f"--set {item!r}: expected DISPATCHER_NAME=VALUE")
        pairs.append((name, value))
    changes["dispatcher_env"] = tuple(pairs)
    return Options.quick_run(**changes) if args.quick else dataclasses.replace(Options(), **changes)
