"""Chaos fixtures: the chaos receiver, the scenario table, and the short/long switch.

``DISPATCHER_CHAOS_LONG=1`` (``make chaos``) runs the long form: more seeds, bigger backlogs.
The short form runs inside ``make test``. At the end of the session the table of scenarios
(lost, duplicates, inversions, the scenario's own figure) is printed and written to
``.dispatcher/chaos-table.md``. Under pytest-xdist (``make test`` runs ``-n 2``) each worker
hands its rows to the controller, which prints the table; the controller loads this file
because ``tests/chaos`` is one of the ``testpaths`` (pyproject.toml).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests import support
from tests.chaos import receiver as chaos_receiver

LONG = os.environ.get("DISPATCHER_CHAOS_LONG", "") not in ("", "0")
ROWS: list[dict[str, Any]] = []


def record(scenario: str, verdict: Any, figure: str) -> None:
    ROWS.append(
        {
            "scenario": scenario,
            "lost": verdict.lost,
            "duplicates": verdict.duplicates,
            "inversions": verdict.inversions,
            "figure": figure,
        }
    )


def table() -> str:
    lines = [
        "| scenario | lost | duplicates | inversions | figure |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['scenario']} | {r['lost']} | {r['duplicates']} | {r['inversions']} | {r['figure']} |"
        for r in ROWS
    ]
    return "\n".join(lines)


def pytest_sessionfinish(session: pytest.Session) -> None:
    # An xdist worker: its rows travel to the controller with the worker's output.
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["chaos_rows"] = list(ROWS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    # The xdist controller: collect each worker's rows as it finishes.
    ROWS.extend(getattr(node, "workeroutput", {}).get("chaos_rows", []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    text = table()
    terminalreporter.write_sep("=", f"chaos scenarios ({'long' if LONG else 'short'} form)")
    terminalreporter.write_line(text)
    out = support.ROOT / ".dispatcher" / "chaos-table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


@pytest.fixture
async def chaos() -> AsyncIterator[chaos_receiver.ChaosReceiver]:
    r = await chaos_receiver.start()
    yield r
    await r.stop()
