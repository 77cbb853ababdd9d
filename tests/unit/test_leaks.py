"""The suite-wide secret check finds what it must (and lets the one-time display through)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher import signing
from tests import leaks

PLANTED_SECRET = "whsec_" + "cGxhbnRlZC1ieS10aGUtbGVhay10ZXN0"


def test_module_constants_named_as_secrets_are_registered() -> None:
    # conftest registered this module's constants at collection.
    assert leaks.found_in(f"level=info msg={PLANTED_SECRET}")
    assert not leaks.found_in("level=info msg=nothing to see")


def test_generated_secrets_are_registered() -> None:
    made = signing.generate_secret()
    assert leaks.found_in(f"created {made}")


def test_sections_and_log_files_are_scanned(tmp_path: Path) -> None:
    log = tmp_path / "dispatcher.log"
    log.write_text(f'{{"event": "oops", "detail": "{PLANTED_SECRET}"}}\n')
    leaks.watch_file(log)
    try:
        problems = leaks.scan_sections([("Captured stdout call", f"x {PLANTED_SECRET} y")])
    finally:
        leaks.forget_files()
    assert len(problems) == 2
    assert all(PLANTED_SECRET not in p for p in problems), "the report must not leak it"


def test_cli_output_may_hand_out_a_secret_only_on_stdout_of_add_and_rotate() -> None:
    leaks.check_cli(["subscriptions", "add", "--url", "x"], f'{{"secret": "{PLANTED_SECRET}"}}', "")
    with pytest.raises(AssertionError, match="printed a secret"):
        leaks.check_cli(["subscriptions", "add"], "", f"error: {PLANTED_SECRET}")
    with pytest.raises(AssertionError, match="printed a secret"):
        leaks.check_cli(["subscriptions", "list"], PLANTED_SECRET, "")
