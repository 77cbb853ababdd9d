"""`dispatcher demo` on a clean embedded data directory with no DATABASE_URL, as `make demo`
runs it for a new user: exits 0, shows the verified COMPLETE webhook and the results, and
keeps the child processes' log lines off the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests import support

DEMO_DEADLINE_SECONDS = 90


def test_demo_on_a_fresh_embedded_database(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DATABASE_URL" and not k.startswith(("DISPATCHER_", "AGENT_"))
    }
    env["DISPATCHER_PGDATA"] = str(tmp_path / "pgdata")
    env["PYTHONIOENCODING"] = "utf-8"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher", "demo"],
        cwd=support.ROOT,
        env=env,
        capture_output=True,
        timeout=DEMO_DEADLINE_SECONDS,
        check=False,
    )
    elapsed = time.monotonic() - started
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert elapsed < 60, f"demo took {elapsed:.1f}s"
    assert "embedded Postgres, " in out
    assert "migrations applied (001_init …" in out
    assert "← 202 Accepted" in out
    lines = out.splitlines()
    webhooks = [line for line in lines if "✓ verified" in line]
    assert [line.split()[4] for line in webhooks] == [
        "DATA_ENRICHMENT_COMPLETE",
        "CRITERIA_CHECK_COMPLETE",
        "COMPLETE",
    ]
    assert "LEAD_QUALIFICATION_COMPLETE" in webhooks[-1]
    assert any("on purpose" in line for line in lines), "the injected failure is not shown"
    assert "ana@stripe.com" in out
    assert "matches the webhook" in out
    assert "stopped" in out
    # No structured log line from the children reached the terminal.
    assert '"event":' not in out
    assert '"level"' not in out
    assert (tmp_path / "demo-logs" / "agent.log").exists()
