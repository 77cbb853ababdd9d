"""Standard Webhooks v1: ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` = ``v1,<base64 HMAC-SHA256("id.ts.body")>``,
one space-separated entry per ``whsec_`` secret still valid (rotation grace period).

Only ``whsec_<base64>`` secrets sign here (the key is the decoded base64, as every public
verifier derives it). A subscription keyed with a plain secret, which signs only its body-HMAC
header, still gets ``webhook-id`` and ``webhook-timestamp`` (receivers de-duplicate on the id)
but no ``webhook-signature``."""

from __future__ import annotations

import base64

from dispatcher import signing

# Keyed by the whole ``whsec_`` string; the key is its decoded base64.
_MACS = signing.KeyedMacs(signing.secret_key_bytes)


class StandardWebhooksSigner:
    name = "standard-webhooks"

    def headers(self, item: signing.SigningInput) -> dict[str, str]:
        # Never an unsigned request: a plain secret without a body-HMAC header signs nothing.
        signing.check_secret_scheme(item.secrets[0], item.header_name)
        prefix = f"{item.msg_id}.{item.timestamp}.".encode()
        parts = []
        for secret in item.secrets:
            if not signing.is_standard_secret(secret):
                continue
            mac = _MACS.new(secret)
            mac.update(prefix)
            mac.update(item.body)
            parts.append("v1," + base64.b64encode(mac.digest()).decode())
        headers = {"webhook-id": item.msg_id, "webhook-timestamp": str(item.timestamp)}
        if parts:
            headers["webhook-signature"] = " ".join(parts)
        return headers
