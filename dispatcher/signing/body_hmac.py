"""Body-only HMAC in the GitHub/AgentX style: ``<header>: sha256=<hex HMAC-SHA256(body)>``.

The key is the secret string's UTF-8 bytes exactly as shown to the user, so the receiver's
``hmac.new(secret.encode(), raw_body, sha256)`` matches. Only the current secret signs: the
header carries one value, and receivers of this style compare one string. Zero-downtime
rotation is what the Standard Webhooks header (always sent) is for."""

from __future__ import annotations

from dispatcher import signing

# The key is the secret string's UTF-8 bytes.
_MACS = signing.KeyedMacs(str.encode)


class BodyHmacSigner:
    name = "body-hmac"

    def headers(self, item: signing.SigningInput) -> dict[str, str]:
        if not item.header_name:
            raise signing.SigningError("body-hmac signer needs a signature header name")
        mac = _MACS.new(item.secrets[0])
        mac.update(item.body)
        digest = mac.hexdigest()
        return {item.header_name: "sha256=" + digest}
