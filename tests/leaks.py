"""The suite-wide secret check: every secret and token the tests create is looked for in every
log line and command output the suite captures, and a test whose output holds one fails.

What is looked for (per process, so it works the same in every xdist worker):
- module-level string constants of the test modules whose names say they are secret
  (``SECRET``, ``TOKEN``, ``WHSEC``, ``CREDENTIAL``, ``PASSWORD``, ``API_KEY``, ``K1``...);
- every secret the dispatcher generates in this process (``signing.generate_secret``);
- anything a test passes to :func:`register`.

Where (see ``tests/conftest.py``): the captured stdout, stderr and log records of each test
phase (the in-process dispatcher's log lines included), the log files of spawned dispatchers
(:func:`watch_file`), and the output of every CLI run (:func:`check_cli`). The only output
allowed to show a secret is the command that hands one out (``subscriptions add`` and
``rotate-secret``, ``secrets generate-key``), on stdout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

MIN_LENGTH = 12  # shorter constants are names and fixtures, not credentials
_SECRET_NAME = re.compile(
    r"(SECRET|TOKEN|WHSEC|CREDENTIAL|PASSWORD|API_KEY)|^K\d+$|^(OLD|NEW)_KEY$", re.IGNORECASE
)
# Commands whose stdout is the secret they just made (shown once, on purpose).
_HANDS_OUT_SECRETS = (
    ("subscriptions", "add"),
    ("subscriptions", "rotate-secret"),
    ("secrets", "generate-key"),
)

_known: set[str] = set()
_files: set[Path] = set()


def register(*values: str) -> None:
    """Look for these values in everything captured from now on."""
    _known.update(v for v in values if isinstance(v, str) and len(v) >= MIN_LENGTH)


def register_module(module: ModuleType) -> None:
    for name, value in vars(module).items():
        if isinstance(value, str) and _SECRET_NAME.search(name):
            register(value)


def watch_file(path: Path) -> None:
    """A log file a spawned process writes; read when the test ends."""
    _files.add(path)


def found_in(text: str) -> list[str]:
    """The registered values in ``text``, shortened so the report itself leaks nothing."""
    return [f"{value[:4]}…({len(value)} chars)" for value in _known if value in text]


def scan_sections(sections: Iterable[tuple[str, str]]) -> list[str]:
    problems = [f"{title}: {hit}" for title, text in sections for hit in found_in(text)]
    for path in sorted(_files):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        problems.extend(f"log file {path.name}: {hit}" for hit in found_in(text))
    return problems


def forget_files() -> None:
    _files.clear()


def check_cli(args: Sequence[str], out: str, err: str) -> None:
    """Fail when a CLI run printed a secret where it must not."""
    hands_out = tuple(args[:2]) in _HANDS_OUT_SECRETS
    leaked = [f"stderr: {hit}" for hit in found_in(err)]
    if not hands_out:
        leaked += [f"stdout: {hit}" for hit in found_in(out)]
    assert not leaked, f"dispatcher {' '.join(args[:2])} printed a secret: {leaked}"


def wrap_generator(module: Any, name: str) -> None:
    """Register every value ``module.name()`` returns (secrets the code under test makes)."""
    original = getattr(module, name)
    if getattr(original, "_registers_leaks", False):
        return

    def generate(*args: Any, **kwargs: Any) -> Any:
        value = original(*args, **kwargs)
        register(value)
        return value

    generate._registers_leaks = True  # type: ignore[attr-defined]
    setattr(module, name, generate)
