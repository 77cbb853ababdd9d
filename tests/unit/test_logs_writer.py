"""The log writer: lines logged inside an event loop are written together at the end of the
loop's pass (one write instead of one per line), at once outside a loop, and all of them by
``logs.flush()``; timestamps keep structlog's ISO/UTC format."""

from __future__ import annotations

import asyncio
import datetime
import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from dispatcher import logs

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")


@pytest.fixture
def log_file(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    path = tmp_path / "out.log"
    with open(path, "w") as stream:
        logs.configure(level="info", fmt="json", stream=stream)
        yield path
        logs.flush()
    structlog.reset_defaults()


def _lines(path: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_outside_an_event_loop_each_line_is_written_at_once(log_file: pathlib.Path) -> None:
    structlog.get_logger("t").info("first", n=1)
    assert [line["event"] for line in _lines(log_file)] == ["first"]
    structlog.get_logger("t").info("second", n=2)
    assert [line["n"] for line in _lines(log_file)] == [1, 2]


async def test_lines_of_one_loop_pass_are_written_at_its_end(log_file: pathlib.Path) -> None:
    log = structlog.get_logger("t")
    for n in range(3):
        log.info("attempt", n=n)
    assert _lines(log_file) == []  # still this pass
    await asyncio.sleep(0)  # one pass later
    assert [line["n"] for line in _lines(log_file)] == [0, 1, 2]
    log.info("attempt", n=3)
    logs.flush()
    assert [line["n"] for line in _lines(log_file)] == [0, 1, 2, 3]


async def test_a_burst_is_written_before_it_grows_past_the_limit(log_file: pathlib.Path) -> None:
    log = structlog.get_logger("t")
    for n in range(logs.MAX_PENDING_LINES):
        log.info("attempt", n=n)
    assert len(_lines(log_file)) == logs.MAX_PENDING_LINES


def test_a_loop_closed_before_its_pass_ended_does_not_stop_later_writes(
    log_file: pathlib.Path,
) -> None:
    async def log_and_leave() -> None:
        structlog.get_logger("t").info("in_first_loop")

    loop = asyncio.new_event_loop()
    loop.run_until_complete(log_and_leave())
    loop.close()  # the scheduled write may not have run

    async def log_again() -> None:
        structlog.get_logger("t").info("in_second_loop")
        await asyncio.sleep(0)

    asyncio.run(log_again())
    assert [line["event"] for line in _lines(log_file)] == ["in_first_loop", "in_second_loop"]


def test_reconfiguring_writes_what_the_previous_writer_held(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "out.log"
    try:
        with open(path, "w") as stream:

            async def log_one() -> None:
                logs.configure(fmt="json", stream=stream)
                structlog.get_logger("t").info("held")
                logs.configure(fmt="json", stream=stream)

            asyncio.run(log_one())
            assert [line["event"] for line in _lines(path)] == ["held"]
    finally:
        structlog.reset_defaults()


def test_timestamps_keep_structlogs_iso_utc_format(
    log_file: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    structlog.get_logger("t").info("now")
    whole_second = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
    monkeypatch.setattr(logs.time, "time_ns", lambda: whole_second)
    structlog.get_logger("t").info("on_the_second")
    monkeypatch.setattr(logs.time, "time_ns", lambda: whole_second + 5_000)
    structlog.get_logger("t").info("five_micros_later")
    stamps = [line["timestamp"] for line in _lines(log_file)]
    assert all(ISO_UTC.match(stamp) for stamp in stamps), stamps
    now = datetime.datetime.now(datetime.UTC)
    parsed = datetime.datetime.fromisoformat(stamps[0])
    assert abs((now - parsed).total_seconds()) < 60
    assert stamps[1:] == ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.000005Z"]


def test_a_closed_stream_drops_lines_instead_of_raising(tmp_path: pathlib.Path) -> None:
    try:
        with open(tmp_path / "out.log", "w") as stream:
            logs.configure(fmt="json", stream=stream)
        structlog.get_logger("t").info("after_close")  # must not raise at the caller
        logs.flush()
    finally:
        structlog.reset_defaults()
