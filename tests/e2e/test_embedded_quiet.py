"""The embedded Postgres prints nothing but our own output: pgserver asks platformdirs for a
runtime directory when it is imported, which warns (RuntimeDirWarning) in containers and CI
where XDG_RUNTIME_DIR is unset; ``dispatcher migrate`` must not pass that on to the user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import support


def test_migrate_on_the_embedded_postgres_without_xdg_runtime_dir_is_quiet(
    tmp_path: Path,
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XDG_RUNTIME_DIR", "DATABASE_URL", "PYTHONWARNINGS")
        and not k.startswith("DISPATCHER_")
    }
    env["DISPATCHER_PGDATA"] = str(tmp_path / "pgdata")
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher", "migrate"],
        env=env,
        cwd=support.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("applied: 001_init.sql"), done.stdout
    assert done.stderr == "", done.stderr
