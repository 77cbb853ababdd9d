"""Layering: the database layer loads without the HTTP stack (it shares plain types through
``dispatcher.model``, never the sender's module). Checked in a fresh interpreter so modules
other tests imported cannot hide a regression."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import importlib, pkgutil, sys
import dispatcher.db
names = sorted(m.name for m in pkgutil.iter_modules(dispatcher.db.__path__))
for name in names:
    importlib.import_module("dispatcher.db." + name)
print(",".join(names))
print(",".join(sorted(m for m in sys.modules if m == "aiohttp" or m.startswith("aiohttp."))))
"""


def test_nothing_under_db_loads_aiohttp() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    imported, loaded = done.stdout.splitlines()
    # The probe really walked the package (a broken walk would pass vacuously).
    assert {"repository", "management", "migrate", "pool"} <= set(imported.split(","))
    assert loaded == "", f"dispatcher.db imports aiohttp: {loaded}"
