"""Numbered, append-only SQL migrations from ``sql/``, applied under an advisory lock.

Safe when several replicas start at once: the first takes the lock and applies, the others
wait for it and then find nothing to do. Each file is recorded with a checksum so an edited,
already-applied migration is reported instead of silently diverging.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
# Any constant works; it only has to be the same for every dispatcher.
ADVISORY_LOCK_ID = 7_301_946_112
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    pass


class SchemaNotReady(MigrationError):
    """The database lacks migrations this code needs: run ``dispatcher migrate``."""


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load(sql_dir: Path = SQL_DIR) -> list[Migration]:
    found = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file {path.name!r} is not named NNN_name.sql")
        found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a number: {versions}")
    return found


async def apply(conn: Any, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply what is missing; return the names applied now."""
    migrations = load(sql_dir)
    applied_now: list[str] = []
    async with conn.transaction():
        # Serialises concurrent migrators; released at commit.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_ID)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS dispatcher_migrations (
                version    integer PRIMARY KEY,
                name       text        NOT NULL,
                checksum   text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM dispatcher_migrations")
        }
        for migration in migrations:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"{migration.name} was changed after it was applied; add a new migration"
                    )
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO dispatcher_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied_now.append(migration.name)
    return applied_now


async def pending(conn: Any, sql_dir: Path = SQL_DIR) -> list[str]:
    """Names of migrations not yet applied (empty when the schema is current)."""
    migrations = load(sql_dir)
    exists = await conn.fetchval("SELECT to_regclass('dispatcher_migrations') IS NOT NULL")
    done: set[int] = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM dispatcher_migrations")}
    return [m.name for m in migrations if m.version not in done]


async def require_current(pool: Any) -> None:
    """Refuse to serve on a schema that is behind the code."""
    async with pool.acquire() as conn:
        missing = await pending(conn)
    if missing:
        raise SchemaNotReady(
            f"database schema is not current (missing {', '.join(missing)}); "
            "run `dispatcher migrate` first"
        )
