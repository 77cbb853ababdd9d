"""The processes a bench run starts: the receiver, the dispatchers under test (``Fleet``), and
spawned helper children (the ceiling client, the naive loop, the peer).

Each is measured from outside through /proc. Nothing here touches the bench database.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from dispatcher.bench import measure

# -- the receiver process ----------------------------------------------------------------------


class ReceiverProcess:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.bench.receiver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.strip():
            raise RuntimeError("the bench receiver did not start")
        self.port = int(line)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def url(self, kind: str, tag: str, n: int = 0) -> str:
        return f"http://127.0.0.1:{self.port}/{kind}/{tag}/{n}"

    async def stats(self) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{self.port}/_stats") as resp:
            data: dict[str, Any] = orjson.loads(await resp.read())
            return data

    async def tag(self, name: str) -> dict[str, Any]:
        empty = {"count": 0, "first": 0.0, "last": 0.0, "latencies": []}
        return dict((await self.stats()).get(name, empty))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)


# -- dispatcher processes ----------------------------------------------------------------------


class Fleet:
    """``python -m dispatcher run`` times n against the bench database, logs in a temp dir."""

    def __init__(
        self, dsn: str, env: Mapping[str, str], log_dir: Path, settings: Mapping[str, str]
    ) -> None:
        self._dsn = dsn
        self._env = {k: v for k, v in env.items() if not k.startswith("DISPATCHER_")}
        self._log_dir = log_dir
        self._settings = dict(settings)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.logs: list[Path] = []
        self._terminated: set[int] = set()

    def start(self, n: int, name: str) -> None:
        for i in range(n):
            port = measure.free_port()
            env = {
                **self._env,
                "DATABASE_URL": self._dsn,
                "DISPATCHER_LISTEN": f"127.0.0.1:{port}",
                "DISPATCHER_ALLOW_CIDRS": "127.0.0.1/32",
                "DISPATCHER_WORKER_ID": f"bench-{name}-{i}",
                "DISPATCHER_LOG_FORMAT": "json",
                "DISPATCHER_LOG_LEVEL": "info",
                "DISPATCHER_SHUTDOWN_GRACE": "1",
                **self._settings,
            }
            log_path = self._log_dir / f"{name}-{i}.log"
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dispatcher", "run"],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self.procs.append(proc)
            self.ports.append(port)
            self.logs.append(log_path)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            for proc, port, log_path in zip(self.procs, self.ports, self.logs, strict=True):
                while True:
                    if proc.poll() is not None:
                        tail = log_path.read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"dispatcher exited ({proc.returncode}):\n{tail}")
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            if resp.status == 200:
                                break
                    if time.monotonic() > deadline:
                        raise RuntimeError("dispatcher did not become ready")
                    await asyncio.sleep(0.05)  # poll interval while the process starts

    async def wait_draining(self, timeout: float = 15.0) -> None:
        """Until no process answers /readyz with 200: each has stopped claiming (or exited)."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            for proc, port in zip(self.procs, self.ports, strict=True):
                while proc.poll() is None and time.monotonic() < deadline:
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            if resp.status != 200:
                                break
                    except (aiohttp.ClientError, OSError):
                        break
                    await asyncio.sleep(0.02)  # poll interval while the signal is handled

    def cpu_seconds(self) -> float | None:
        values = [measure.proc_cpu_seconds(p.pid) for p in self.procs]
        return None if any(v is None for v in values) else sum(v or 0.0 for v in values)

    def memory(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for p in self.procs:
            for key, value in measure.proc_memory_bytes(p.pid).items():
                total[key] = total.get(key, 0) + value
        return total

    def terminate(self) -> None:
        """SIGTERM each process once: a second SIGTERM makes the dispatcher exit at once."""
        for p in self.procs:
            if p.poll() is None and p.pid not in self._terminated:
                p.send_signal(signal.SIGTERM)
                self._terminated.add(p.pid)

    async def stop(self) -> None:
        self.terminate()
        deadline = time.monotonic() + 15
        for p in self.procs:
            while p.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 (a process, not an event)
                await asyncio.sleep(0.05)  # poll interval while the process drains
            if p.poll() is None:
                p.kill()
                p.wait(5)
        self.procs.clear()
        self.ports.clear()


class Child:
    """A spawned helper process, measured from outside like the dispatcher."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._proc = ctx.Process(target=target, args=args, daemon=True)

    def start(self) -> None:
        self._proc.start()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.is_alive()

    async def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._proc.is_alive() and time.monotonic() < deadline:  # noqa: ASYNC110 (a process)
            await asyncio.sleep(0.05)  # poll interval while the child finishes
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(5)


# -- child processes: the ceiling client and the naive loop ------------------------------------


def run_loop(coro: Any, *, uvloop_ok: bool) -> None:
    if uvloop_ok:
        try:
            import uvloop  # noqa: PLC0415

            uvloop.run(coro)
            return
        except ImportError:
            pass
    asyncio.run(coro)
