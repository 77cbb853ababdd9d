"""What the container image runs, run directly: Docker cannot run on our machines, so these
tests take the image's pieces one by one instead of building it.

- The wheel, built from exactly the files deploy/Dockerfile copies into its build stage,
  carries the SQL migrations, and ``dispatcher migrate`` run from that wheel (not from the
  source tree) and without ``pgserver`` (which the image leaves out) migrates an empty
  database — what ``docker run IMAGE migrate`` does.
- The console script behind ``ENTRYPOINT ["dispatcher"]`` / ``CMD ["run"]`` starts with the
  image's environment, and the Dockerfile's HEALTHCHECK command passes against it, fails once
  it has stopped, and SIGTERM stops it cleanly.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dispatcher import ports
from tests import support
from tests.integration import test_deploy

ROOT = support.ROOT
# What the Dockerfile's build stage COPYs (its test pins the same list).
BUILD_CONTEXT = ("pyproject.toml", "README.md", "sql", "dispatcher")
MIGRATIONS = sorted(p.name for p in (ROOT / "sql").glob("*.sql"))


# `dispatcher ARGS…` as the image runs it: pgserver is not installed there, so importing it
# must fail (a None entry in sys.modules makes the import raise ImportError).
WITHOUT_PGSERVER = (
    "import sys; sys.modules['pgserver'] = None; "
    "from dispatcher import cli; sys.exit(cli.main(sys.argv[1:]))"
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DISPATCHER_", "AGENT_")) and k not in {"DATABASE_URL", "PYTHONPATH"}
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package wheel, built (non-editable) from a copy of the Docker build context."""
    context = tmp_path_factory.mktemp("context")
    for name in BUILD_CONTEXT:
        source = ROOT / name
        if source.is_dir():
            # symlinks=True: dispatcher/sql stays a link into sql/, as COPY leaves it.
            shutil.copytree(
                source,
                context / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        else:
            shutil.copy2(source, context / name)
    assert (context / "dispatcher" / "sql").is_symlink()
    out = tmp_path_factory.mktemp("wheels")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(context)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("dispatcher-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's files as an install would lay them out (put first on PYTHONPATH)."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


@pytest.mark.parametrize(
    ("packaged", "source"),
    [("dispatcher/sql/", ROOT / "sql"), ("dispatcher/agent/sql/", ROOT / "dispatcher/agent/sql")],
)
def test_wheel_ships_every_migration(wheel: Path, packaged: str, source: Path) -> None:
    """Both tracks: the dispatcher's and the reference agent's own."""
    with zipfile.ZipFile(wheel) as archive:
        shipped = {
            name.removeprefix(packaged): archive.read(name)
            for name in archive.namelist()
            if name.startswith(packaged)
        }
    assert sorted(shipped) == sorted(p.name for p in source.glob("*.sql"))
    assert shipped
    for name, content in shipped.items():
        assert content == (source / name).read_bytes(), name


async def _python(installed: Path, *args: str, **env: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=_clean_env(PYTHONPATH=str(installed), **env),
        cwd=installed.parent,  # not the repository: nothing may come from the source tree
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_migrate_from_the_installed_wheel(installed: Path, empty_dsn: str) -> None:
    code, out = await _python(
        installed, "-c", "from dispatcher.db import migrate; print(migrate.SQL_DIR)"
    )
    assert code == 0, out
    assert Path(out.strip()).is_relative_to(installed), "imported the source tree, not the wheel"

    code, out = await _python(installed, "-c", WITHOUT_PGSERVER, "migrate", DATABASE_URL=empty_dsn)
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "applied: " + ", ".join(MIGRATIONS)
    code, out = await _python(installed, "-c", WITHOUT_PGSERVER, "migrate", DATABASE_URL=empty_dsn)
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "schema is up to date"


def test_image_requirements_leave_out_only_the_embedded_postgres(wheel: Path) -> None:
    """…and take the tracing extra in, unconditionally (no ``extra ==`` marker left)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "image_requirements.py"), str(wheel)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    names = {re.match(r"[\w.-]+", line).group().lower() for line in result.stdout.splitlines()}  # type: ignore[union-attr]
    assert "pgserver" not in names
    assert {"aiohttp", "asyncpg", "structlog", "prometheus-client", "orjson"} <= names
    assert not names & {"pytest", "ruff", "mypy"}, "dev extras must stay out of the image"
    tracing = {"opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"}
    assert tracing <= names
    assert "extra" not in result.stdout


def _console_script() -> str:
    script = Path(sys.executable).parent / "dispatcher"
    return str(script) if script.exists() else "dispatcher"


def test_entrypoint_help_lists_the_subcommands() -> None:
    result = subprocess.run(
        [_console_script(), "--help"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for command in ("run", "migrate", "agent"):
        assert f"    {command} " in result.stdout, command


async def _healthcheck(listen: str) -> int:
    """The Dockerfile's HEALTHCHECK command with this interpreter as `python`."""
    argv = test_deploy.healthcheck_argv()
    assert argv[0] == "python"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv[1:],
        env=_clean_env(DISPATCHER_LISTEN=listen),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_entrypoint_run_passes_the_healthcheck_and_stops_on_sigterm(
    dsn: str, tmp_path: Path
) -> None:
    port = ports.free_port()
    log = tmp_path / "dispatcher.log"
    # The image's environment, except that tests listen on loopback only. The health check is
    # told the wildcard address the image uses, which it must map to loopback.
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once; waits go through to_thread)
            [_console_script(), "run"],
            env=_clean_env(
                DATABASE_URL=dsn,
                DISPATCHER_LISTEN=f"127.0.0.1:{port}",
                DISPATCHER_LOG_FORMAT="json",
                DISPATCHER_SHUTDOWN_GRACE="2",
                PYTHONUNBUFFERED="1",
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        async def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            return await _healthcheck(f"0.0.0.0:{port}") == 0

        await support.wait_for(healthy, timeout=30, interval=0.2, message="healthcheck to pass")
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0, log.read_text()
        assert await _healthcheck(f"0.0.0.0:{port}") != 0
        assert await _healthcheck(f"127.0.0.1:{port}") != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert '"dispatcher_stopped"' in log.read_text()
