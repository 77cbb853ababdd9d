"""Embedded Postgres (the ``pgserver`` package) for users who have not set DATABASE_URL.

The server lives in a local data directory, starts on first use and stops when the last
process using it exits. Not for production: it exists so ``make demo`` and ``make test``
need nothing but Python.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(".dispatcher") / "pgdata"


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server and return a DSN for the ``postgres`` database."""
        # pgserver logs every handle at INFO; keep our output readable.
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers); harmless here.
            # pgserver asks for its runtime dir at import time, so the import goes in here too.
            warnings.simplefilter("ignore")
            import pgserver  # noqa: PLC0415 (only needed without DATABASE_URL)

            self._server = pgserver.get_server(  # type: ignore[attr-defined]
                self.data_dir, cleanup_mode="stop"
            )
        return str(self._server.get_uri())

    def stop(self) -> None:
        if self._server is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server.cleanup()
            self._server = None
