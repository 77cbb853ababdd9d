"""Numbered, append-only SQL migrations, applied per track under an advisory lock.

A track is a directory of ``NNN_name.sql`` files with its own bookkeeping table: the
dispatcher's schema (``CORE``, ``sql/``, applied by ``dispatcher migrate``) and, separately,
what an application beside it needs (the reference agent's track lives in its package and is
applied by ``dispatcher agent --migrate``), so the core never creates another program's tables.

Safe when several replicas start at once: the first takes the lock and applies, the others
wait for it and then find nothing to do. Each file is recorded with a checksum so an edited,
already-applied migration is reported instead of silently diverging. Versions recorded
without a file (a migration that moved to another track) are left alone.
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
class Track:
    name: str
    sql_dir: Path
    # Bookkeeping table of this track (a trusted constant, interpolated into the SQL).
    table: str
    # The command that applies it, for the schema guard's message.
    command: str


CORE = Track("dispatcher", SQL_DIR, "dispatcher_migrations", "dispatcher migrate")


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load(track: Track = CORE) -> list[Migration]:
    found = []
    for path in sorted(track.sql_dir.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file {path.name!r} is not named NNN_name.sql")
        found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a number: {versions}")
    return found


async def apply(conn: Any, track: Track = CORE) -> list[str]:
    """Apply what is missing of ``track``; return the names applied now."""
    migrations = load(track)
    applied_now: list[str] = []
    async with conn.transaction():
        # Serialises concurrent migrators of every track; released at commit.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_ID)
        await conn.execute(
            f"""
            CREATE TABLE IF NOT EXISTS {track.table} (
                version    integer PRIMARY KEY,
                name       text        NOT NULL,
                checksum   text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch(f"SELECT version, checksum FROM {track.table}")
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
                f"INSERT INTO {track.table} (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied_now.append(migration.name)
    return applied_now


async def pending(conn: Any, track: Track = CORE) -> list[str]:
    """Names of ``track``'s migrations not yet applied (empty when it is current)."""
    migrations = load(track)
    # Plain reads.
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", track.table)
    done: set[int] = set()
    if exists:
        done = {r["version"] for r in await conn.fetch(f"SELECT version FROM {track.table}")}
    return [m.name for m in migrations if m.version not in done]


async def require_current(pool: Any, *tracks: Track) -> None:
    """Refuse to serve on a schema that is behind the code (``CORE`` unless tracks are
    named); the error names the first track that is behind and the command that applies it."""
    async with pool.acquire() as conn:
        for track in tracks or (CORE,):
            missing = await pending(conn, track)
            if missing:
                raise SchemaNotReady(
                    f"database schema is not current (missing {', '.join(missing)}"
                    f"{'' if track is CORE else ' of the ' + track.name + ' track'}); "
                    f"run `{track.command}` first"
                )
