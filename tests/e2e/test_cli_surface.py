"""The CLI as a user first meets it, as real subprocesses: ``--version``, the top-level
``--help`` (a description for users, and light: neither aiohttp nor the benchmark is
imported), and the generated configuration reference kept current."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dispatcher
from tests import support

CONFIGURATION = support.ROOT / "docs" / "configuration.md"


def _python(*args: str, cwd: Path = support.ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "AGENT_"))}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version() -> None:
    done = _python("-m", "dispatcher", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dispatcher {dispatcher.__version__}"


def test_top_level_help_is_for_users() -> None:
    done = _python("-m", "dispatcher", "--help")
    assert done.returncode == 0, done.stderr
    description = done.stdout.split("\n\n")[1]
    assert "webhook" in description
    # Not a developer docstring: no reStructuredText markup, no talk of modules.
    assert "``" not in done.stdout
    assert "os.environ" not in done.stdout
    assert "module" not in description
    assert "--version" in done.stdout


def test_help_loads_neither_aiohttp_nor_the_benchmark() -> None:
    done = _python("-X", "importtime", "-m", "dispatcher", "--help")
    assert done.returncode == 0, done.stderr
    # importtime lines: "import time: self | cumulative | <indent>module"
    loaded = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "dispatcher.cli" in loaded, "importtime output changed shape"
    heavy = {
        name
        for name in loaded
        if name.split(".")[0] in {"aiohttp", "asyncpg", "yarl"}
        or re.fullmatch(r"dispatcher\.bench(\..*)?", name)
    }
    assert heavy == set()


def test_configuration_reference_is_current(tmp_path: Path) -> None:
    done = _python("-m", "dispatcher.cli.reference", "--check", str(CONFIGURATION))
    assert done.returncode == 0, done.stderr
    # The check can fail: a stale row is found, and --write repairs it.
    stale = tmp_path / "configuration.md"
    shutil.copy(CONFIGURATION, stale)
    text = stale.read_text(encoding="utf-8")
    row = "| `DISPATCHER_MAX_IN_FLIGHT` | `256` |"
    assert row in text
    stale.write_text(text.replace(row, row.replace("256", "128")), encoding="utf-8")
    done = _python("-m", "dispatcher.cli.reference", "--check", str(stale))
    assert done.returncode == 1
    assert "out of date" in done.stderr
    assert _python("-m", "dispatcher.cli.reference", "--write", str(stale)).returncode == 0
    assert stale.read_text(encoding="utf-8") == text
