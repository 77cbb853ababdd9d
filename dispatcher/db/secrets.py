"""Re-encrypting stored subscription secrets under the current key (``dispatcher secrets
reencrypt``).

The sealing itself is ``dispatcher.secretbox``; this module only pages over the rows and
writes them back with a compare-and-set. It must never log or return a secret.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import orjson

from dispatcher import secretbox
from dispatcher.db import operational


@dataclasses.dataclass(frozen=True, slots=True)
class Reencrypted:
    subscriptions: int = 0
    resealed: int = 0
    raced: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_REENCRYPT_PAGE_SQL = """
-- Keyset page over subscriptions; plain read (the write below is a compare-and-set).
SELECT id, secret, previous_secret, headers::text AS headers FROM webhook_subscriptions
WHERE $1::uuid IS NULL OR id > $1 ORDER BY id LIMIT $2
"""

_RESEAL_SQL = """
-- Compare-and-set: only if the row still holds what was read, so a rotation that committed
-- in between is never overwritten (the row is then read again). The row lock waits for a
-- claim in progress on this subscription; claims read either form, both open.
UPDATE webhook_subscriptions
SET secret = $2, previous_secret = $3, headers = $6::jsonb
WHERE id = $1 AND secret = $4 AND previous_secret IS NOT DISTINCT FROM $5
  AND headers = $7::jsonb
"""


def _reseal_headers(box: secretbox.SecretBox, stored: str) -> str | None:
    """The ``headers`` column with every value sealed under the current key, or None when
    nothing needs it."""
    headers: dict[str, str] = orjson.loads(stored)
    if not any(box.needs_reseal(value) for value in headers.values()):
        return None
    return orjson.dumps({name: box.seal(box.open(v)) for name, v in headers.items()}).decode()


async def reencrypt(pool: Any, box: secretbox.SecretBox, *, batch: int = 100) -> Reencrypted:
    """Seal every subscription secret (and grace-period previous secret) and custom header
    value under the current key.

    Online: one short statement per changed row, so deliveries go on meanwhile. Every
    replica must already have the new key configured (first or not) before this runs, and
    the old key may be dropped only after it finished.
    """
    if not box.encrypting:
        raise secretbox.SecretBoxError("no current key to re-encrypt under")
    seen = resealed = raced = 0
    after: uuid.UUID | None = None
    while True:
        rows = await pool.fetch(_REENCRYPT_PAGE_SQL, after, batch)
        if not rows:
            return Reencrypted(seen, resealed, raced)
        for row in rows:
            seen += 1
            current, previous, headers = row["secret"], row["previous_secret"], row["headers"]
            while (
                box.needs_reseal(current)
                or box.needs_reseal(previous)
                or _reseal_headers(box, headers) is not None
            ):
                async with pool.acquire() as conn, conn.transaction():
                    # Same secret, new envelope: the operational-event trigger (sql/011)
                    # announces no rotation for it.
                    await conn.execute(operational.MARK_CHANGE_SQL, operational.RESEAL)
                    status = await conn.execute(
                        _RESEAL_SQL,
                        row["id"],
                        box.seal(box.open(current)),
                        None if previous is None else box.seal(box.open(previous)),
                        current,
                        previous,
                        _reseal_headers(box, headers) or headers,
                        headers,
                    )
                if status.endswith(" 1"):
                    resealed += 1
                    break
                raced += 1
                fresh = await pool.fetchrow(
                    "SELECT secret, previous_secret, headers::text AS headers "
                    "FROM webhook_subscriptions WHERE id = $1",
                    row["id"],
                )
                if fresh is None:
                    break  # deleted meanwhile
                current, previous = fresh["secret"], fresh["previous_secret"]
                headers = fresh["headers"]
        after = rows[-1]["id"]
