"""structlog configuration: JSON lines off a terminal, readable console output on one.

Event names are fixed snake_case strings with key/value fields. Callers never pass secrets,
signatures or bodies; the ``drop_sensitive`` processor is a second line of defence.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

SENSITIVE_KEYS = frozenset(
    {
        "secret",
        "secrets",
        "signature",
        "body",
        "payload",
        "password",
        "token",
        "authorization",
        "headers",
    }
)

# Lines held before a write even within one event-loop pass (bounds the memory of a burst).
MAX_PENDING_LINES = 256


def drop_sensitive(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in SENSITIVE_KEYS & event.keys():
        event[key] = "[redacted]"
    return event


class _Timestamp:
    """``timestamp`` as structlog's ISO/UTC stamper writes it (``2026-01-02T03:04:05.678901Z``,
    no fraction on a whole second), with the part up to the seconds formatted once per second:
    a datetime per line was a quarter of the canonical attempt line's cost (bench profile)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        micros = nanos // 1000
        event["timestamp"] = f"{self._prefix}.{micros:06d}Z" if micros else f"{self._prefix}Z"
        return event


class _JsonLine:
    """The JSON format's processors after the context merge, in one call: the same steps in
    the same order (level, timestamp, redaction, exception text, orjson), the last two only
    when the line needs them. A call per step was ~an eighth of the attempt line's cost."""

    def __init__(self) -> None:
        self._timestamp = _Timestamp()

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> bytes:
        event = structlog.processors.add_log_level(logger, name, event)
        event = self._timestamp(logger, name, event)
        if not SENSITIVE_KEYS.isdisjoint(event):
            event = drop_sensitive(logger, name, event)
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(logger, name, event)
        # orjson: json.dumps was ~10x slower.
        return orjson.dumps(event, default=str, option=orjson.OPT_APPEND_NEWLINE)


class LineWriter:
    """The wrapped logger: takes rendered lines and writes them once per event-loop pass.

    A flush per line cost a write syscall per delivery (stderr is unbuffered under
    PYTHONUNBUFFERED, as the tests and container images run it). On a stream with a binary
    layer (a file, a pipe, a terminal), lines logged inside a running event loop are collected
    and written together by a callback at the end of the loop's current pass, or at once when
    ``MAX_PENDING_LINES`` pile up; so a line reaches the stream within one pass. Outside a
    loop (CLI commands, other threads) each line is written at once, and whatever is pending
    at exit is written then. A process killed outright (SIGKILL, ``os._exit``) loses at most
    the lines of its last loop pass. A text-only stream (an in-memory one) has no syscall to
    save and is written line by line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._binary: Any = getattr(stream, "buffer", None)
        self._pending: list[bytes] = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def msg(self, message: str | bytes) -> None:
        if self._binary is None:
            self._stream.write(_as_text(message))
            self._stream.flush()
            return
        line = message if isinstance(message, bytes) else _as_text(message).encode()
        with self._lock:  # a thread may log while the loop's callback writes
            self._pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or len(self._pending) >= MAX_PENDING_LINES:
            self.flush()
        elif self._scheduled_on is not loop:
            # Once per pass. A loop that closed before running the callback (tests run one
            # loop after another) is replaced by the next one that logs.
            self._scheduled_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            self._scheduled_on = None
            pending, self._pending = self._pending, []
            if not pending:
                return
            try:
                self._stream.flush()  # what went through the text layer first keeps its place
                data = memoryview(b"".join(pending))
                while data:
                    # An unbuffered binary layer (FileIO) may take part of a large write.
                    written = self._binary.write(data)
                    if not written:
                        break  # a non-blocking stream that is full: drop rather than spin
                    data = data[written:]
                self._binary.flush()
            except (OSError, ValueError):
                # A closed or broken stream cannot take them; logging must not stop the
                # process (this runs as a loop callback, far from the lines' callers).
                pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _as_text(line: str | bytes) -> str:
    # Rendered JSON is bytes with its newline; console output is text without one.
    return line.decode() if isinstance(line, bytes) else line + "\n"


# The writer of the current configuration (none or one): flushed when replaced and at exit.
_current: list[LineWriter] = []


def flush() -> None:
    """Write whatever log lines are pending (shutdown, or before reading a log in a test)."""
    for writer in _current:
        writer.flush()


atexit.register(flush)


def configure(*, level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """``fmt`` is ``json``, ``console`` or ``auto`` (console when ``stream`` is a terminal)."""
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    steps: list[Any]
    if fmt == "json":
        steps = [_JsonLine()]
    else:
        steps = [
            structlog.processors.add_log_level,
            _Timestamp(),
            drop_sensitive,
            structlog.processors.format_exc_info,
            # Plain tracebacks: the rich formatter prints local variables, which can hold
            # signed headers or a subscription's secret.
            structlog.dev.ConsoleRenderer(
                colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
            ),
        ]
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    flush()
    writer = LineWriter(out)
    _current[:] = [writer]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *steps],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_args: writer,
        cache_logger_on_first_use=False,
    )


def error_text(exc: BaseException) -> str:
    """An exception as a log field that quotes no data.

    A database error's text carries Postgres's DETAIL ("Failing row contains (...)"), which
    quotes the row, secrets included, and its message can quote the offending value; for those
    only the class, SQLSTATE and the names of the constraint, table and column are kept.
    Anything else is ``Type: message``."""
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return f"{type(exc).__name__}: {exc}"
    names = [
        f"{attr}={value}"
        for attr in ("constraint_name", "table_name", "column_name")
        if isinstance(value := getattr(exc, attr, None), str) and value
    ]
    return " ".join([f"{type(exc).__name__} (SQLSTATE {sqlstate})", *names])
