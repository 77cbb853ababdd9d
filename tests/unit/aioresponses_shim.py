"""A documented shim for aioresponses 0.7.9 on aiohttp >= 3.14 (aioresponses issue #289).

aiohttp 3.14 added a required keyword-only ``stream_writer`` argument to
``ClientResponse.__init__``; aioresponses builds responses without it. aiohttp only reads
``stream_writer.output_size`` when no writer is given, so a stand-in with ``output_size=0`` is
enough. ``mocked()`` swaps aioresponses' response class for one that supplies it, and does
nothing on aiohttp versions that do not need it. Delete this file once aioresponses ships the
fix (its PR #288).
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Iterator
from typing import Any

import aiohttp
import aioresponses
import aioresponses.core

NEEDS_SHIM = "stream_writer" in inspect.signature(aiohttp.ClientResponse.__init__).parameters


class _ShimResponse(aiohttp.ClientResponse):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", types.SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


@contextlib.contextmanager
def mocked() -> Iterator[aioresponses.aioresponses]:
    original = aioresponses.core.ClientResponse
    if NEEDS_SHIM:
        aioresponses.core.ClientResponse = _ShimResponse  # type: ignore[misc]
    try:
        with aioresponses.aioresponses() as m:
            yield m
    finally:
        aioresponses.core.ClientResponse = original  # type: ignore[misc]
