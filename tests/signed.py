"""Signed webhook requests for the receiver tests: secrets, a body, and headers signed by
dispatcher's own signers, by the independent ``standardwebhooks`` library, plus the few lines
of hmac a receiver would write for the body-only signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

from dispatcher import signing

OLD = "whsec_" + base64.b64encode(b"old-secret-key-0123456789").decode()
NEW = "whsec_" + base64.b64encode(b"new-secret-key-0123456789").decode()
THIRD = "whsec_" + base64.b64encode(b"third-secret-key-01234567").decode()
HEADER = "X-AgentX-Signature"
BODY = json.dumps(
    {"event": "LEAD_QUALIFICATION_PROGRESS", "job_id": "lq-1", "status": "QUEUED"}
).encode()
NOW = 1_774_700_000


def dispatcher_headers(
    body: bytes = BODY,
    secrets: tuple[str, ...] = (NEW,),
    *,
    msg_id: str = "msg_1",
    timestamp: int = NOW,
    header_name: str | None = HEADER,
) -> dict[str, str]:
    """Headers exactly as dispatcher's sender signs them."""
    registry = signing.SignerRegistry.load()
    item = signing.SigningInput(msg_id, timestamp, body, secrets, header_name)
    return signing.sign(registry.for_subscription(header_name, ()), item)


def library_headers(secret: str, body: bytes, msg_id: str, timestamp: int) -> dict[str, str]:
    """Headers signed independently by the ``standardwebhooks`` library."""
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def body_hmac_accepts(secret: str, raw_body: bytes, signature_header: str) -> bool:
    """A body-HMAC receiver check in a few lines of the standard library."""
    expected = hmac.new(secret.encode("utf-8"), raw_body, hashlib.sha256).hexdigest()
    if signature_header.startswith("sha256="):
        signature_header = signature_header[len("sha256=") :]
    return hmac.compare_digest(expected, signature_header)
