"""structlog configuration: JSON lines off a terminal, readable console output on one.

Event names are fixed snake_case strings with key/value fields. Callers never pass secrets,
signatures or bodies; the ``drop_sensitive`` processor is a second line of defence.
"""

from __future__ import annotations

import logging
import sys
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


def drop_sensitive(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in SENSITIVE_KEYS & event.keys():
        event[key] = "[redacted]"
    return event


def _orjson_dumps(value: Any, **_kw: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def configure(*, level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """``fmt`` is ``json``, ``console`` or ``auto`` (console when ``stream`` is a terminal)."""
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any
    if fmt == "json":
        # orjson: the canonical per-attempt line is on the hot path (json.dumps is ~10x slower).
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    else:
        # Plain tracebacks: the rich formatter prints local variables, which can hold signed
        # headers or a subscription's secret.
        renderer = structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_sensitive,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
