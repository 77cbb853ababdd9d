"""The configuration reference, generated from the settings table.

``python -m dispatcher.cli.reference --check docs/configuration.md`` exits 1 when the table
between the markers in that file differs from what the settings table generates; ``--write``
regenerates it in place. Nothing else in the file is touched. Imported by nothing at run time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Final

from dispatcher.cli import settings

START_MARKER: Final = "<!-- settings-table:start -->"
END_MARKER: Final = "<!-- settings-table:end -->"


class MarkersMissing(ValueError):
    """The document has no place marked for the table."""


def reference_table() -> str:
    """The configuration reference as a Markdown table."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for setting in settings.TABLE:
        default = setting.default_text()
        shown = f"`{default}`" if default else "(empty)"
        lines.append(f"| `{setting.variable}` | {shown} | {setting.doc} |")
    return "\n".join(lines)


def with_reference(document: str) -> str:
    """``document`` with the text between the markers replaced by the generated table."""
    start = document.find(START_MARKER)
    end = document.find(END_MARKER)
    if start < 0 or end < start:
        raise MarkersMissing(f"the markers {START_MARKER} … {END_MARKER} are missing")
    head = document[: start + len(START_MARKER)]
    return f"{head}\n{reference_table()}\n{document[end:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher.cli.reference",
        description="Check or regenerate the configuration reference from the settings table.",
    )
    parser.add_argument("path", type=Path, help="a Markdown file holding the table markers")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when the file is out of date")
    mode.add_argument("--write", action="store_true", help="rewrite the table in place")
    args = parser.parse_args(argv)
    try:
        current = args.path.read_text(encoding="utf-8")
        wanted = with_reference(current)
    except (OSError, MarkersMissing) as exc:
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 2
    if args.write:
        if wanted != current:
            args.path.write_text(wanted, encoding="utf-8")
        return 0
    if wanted != current:
        print(
            f"{args.path}: the configuration table is out of date; run "
            f"python -m dispatcher.cli.reference --write {args.path}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
