"""Standard Webhooks v1: ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` = ``v1,<base64 HMAC-SHA256("id.ts.body")>``,
one space-separated entry per secret still valid (rotation grace period)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from dispatcher import signing


class StandardWebhooksSigner:
    name = "standard-webhooks"

    def headers(self, item: signing.SigningInput) -> dict[str, str]:
        prefix = f"{item.msg_id}.{item.timestamp}.".encode()
        parts = []
        for secret in item.secrets:
            mac = hmac.new(signing.secret_key_bytes(secret), prefix, hashlib.sha256)
            mac.update(item.body)
            parts.append("v1," + base64.b64encode(mac.digest()).decode())
        return {
            "webhook-id": item.msg_id,
            "webhook-timestamp": str(item.timestamp),
            "webhook-signature": " ".join(parts),
        }
