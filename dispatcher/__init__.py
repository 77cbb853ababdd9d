"""dispatcher: an outbound webhook dispatcher that runs beside your app on its Postgres.

Producers insert into the ``webhook_outbox`` table (or call :func:`publish` on their own
connection); the dispatcher routes, signs, delivers, retries and dead-letters.
"""

from __future__ import annotations

from dispatcher.producer import publish

__all__ = ["publish"]
__version__ = "0.1.0"
