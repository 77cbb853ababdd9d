"""Print the requirements the container image installs: the wheel's own and its ``tracing``
extra (OpenTelemetry, off until an OTLP endpoint is configured), minus ``pgserver``.

``pgserver`` (the embedded Postgres) is what lets ``make demo`` run with nothing but Python.
A container always gets ``DATABASE_URL`` and never starts it, and it ships wheels for x86-64
Linux only, so keeping it would make the image fail to build on arm64 (Apple Silicon,
Graviton) and add ~40 MB of Postgres binaries for nothing. The CLI imports it only when
``DATABASE_URL`` is unset.

Used by deploy/Dockerfile's build stage: ``python image_requirements.py WHEEL >
requirements.txt``. Stdlib only; it must run on the bare base image.
"""

from __future__ import annotations

import email
import re
import sys
import zipfile
from pathlib import Path

LEFT_OUT = {"pgserver"}
INCLUDED_EXTRAS = {"tracing"}
_EXTRA = re.compile(r"""^\s*extra\s*==\s*["']([a-z0-9_-]+)["']\s*$""")


def requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional Requires-Dist lines and those of INCLUDED_EXTRAS (without
    their marker), minus LEFT_OUT."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = email.message_from_bytes(archive.read(metadata))
    kept = []
    for requirement in message.get_all("Requires-Dist") or []:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        if match is None:
            raise ValueError(f"unreadable requirement {requirement!r}")
        name = re.sub(r"[-_.]+", "-", match.group()).lower()
        if name in LEFT_OUT:
            continue
        spec, _, marker = requirement.partition(";")
        if "extra ==" in marker:
            extra = _EXTRA.match(marker)
            if extra is None or extra.group(1) not in INCLUDED_EXTRAS:
                continue
            kept.append(spec.strip())
        else:
            kept.append(requirement)
    return kept


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: image_requirements.py WHEEL", file=sys.stderr)
        return 2
    print("\n".join(requirements(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
