"""Subscription secrets at rest: AES-256-GCM envelopes with the key id on every row.

Stored form: ``enc:v1:<key id>:<base64(nonce | ciphertext+tag)>``. The first configured key
seals; every configured key opens, so keys rotate by putting the new key first, running
``dispatcher secrets reencrypt``, and dropping the old key afterwards. Rows written before
encryption was configured (plain ``whsec_…`` text) stay readable, which is what lets an
existing database migrate in place.

This module must not log, and its errors must never carry a secret, a key or a ciphertext.
It has no database access: it works on strings that the repository stores and loads
(re-encrypting stored rows is ``dispatcher.db.secrets.reencrypt``).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "enc:v1:"
KEY_BYTES = 32
NONCE_BYTES = 12
# Decrypted secrets kept per process; the claim path opens the same few ciphertexts over and
# over, so a small cache turns that into a dict lookup. Cleared wholesale when full.
CACHE_ENTRIES = 10_000
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class SecretBoxError(ValueError):
    """A key specification or stored secret that cannot be used (no secret material inside)."""


def _aad(key_id: str) -> bytes:
    # Binds the ciphertext to its format version and key id: relabelling a row fails to open.
    return f"dispatcher:subscription-secret:v1:{key_id}".encode()


def _decode_key(key_id: str, text: str) -> bytes:
    # Standard or URL-safe alphabet, padding optional; validate=True refuses any other
    # character instead of silently dropping it (which would make a different key).
    stripped = text.strip()
    try:
        raw = base64.b64decode(stripped + "=" * (-len(stripped) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise SecretBoxError(f"key {key_id!r} is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise SecretBoxError(f"key {key_id!r} must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def generate_key() -> str:
    """A fresh key in the base64 form DISPATCHER_SECRET_KEYS takes."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


class SecretBox:
    """Seals and opens subscription secrets. With no keys it stores plaintext (and says so
    through :attr:`encrypting`), so a deployment can adopt encryption later."""

    def __init__(self, keys: Sequence[tuple[str, bytes]] = ()) -> None:
        self._keys: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if not _KEY_ID.match(key_id):
                raise SecretBoxError(f"key id {key_id!r} must match {_KEY_ID.pattern}")
            if key_id in self._keys:
                raise SecretBoxError(f"key id {key_id!r} is configured twice")
            if len(key) != KEY_BYTES:
                raise SecretBoxError(f"key {key_id!r} must be {KEY_BYTES} bytes")
            self._keys[key_id] = AESGCM(key)
        self.current_key_id: str | None = keys[0][0] if keys else None
        self._cache: dict[str, str] = {}

    @classmethod
    def from_spec(cls, spec: str) -> SecretBox:
        """``"kid1:base64key,kid2:base64key"`` (first = current); empty = plaintext mode."""
        keys: list[tuple[str, bytes]] = []
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            key_id, sep, text = item.partition(":")
            if not sep or not key_id:
                raise SecretBoxError("each key must look like <key id>:<base64 key>")
            keys.append((key_id, _decode_key(key_id, text)))
        return cls(keys)

    def __repr__(self) -> str:
        return f"SecretBox(current={self.current_key_id!r}, keys={sorted(self._keys)!r})"

    @property
    def encrypting(self) -> bool:
        return self.current_key_id is not None

    def seal(self, secret: str) -> str:
        """Plain secret → stored form (under the current key; plaintext when there is none)."""
        if self.current_key_id is None:
            if secret.startswith(PREFIX):
                # Would be read back as an envelope; refuse instead of storing it ambiguously.
                raise SecretBoxError("a secret may not start with 'enc:v1:'")
            return secret
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self.current_key_id].encrypt(
            nonce, secret.encode(), _aad(self.current_key_id)
        )
        return f"{PREFIX}{self.current_key_id}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, stored: str) -> str:
        """Stored form → plain secret. Plaintext rows come back as they are."""
        if not stored.startswith(PREFIX):
            return stored
        cached = self._cache.get(stored)
        if cached is not None:
            return cached
        key_id, sep, payload = stored[len(PREFIX) :].partition(":")
        if not sep:
            raise SecretBoxError("stored secret is not a valid envelope")
        aead = self._keys.get(key_id)
        if aead is None:
            raise SecretBoxError(
                f"stored secret is sealed with key {key_id!r}, which is not configured "
                "(DISPATCHER_SECRET_KEYS)"
            )
        try:
            raw = base64.b64decode(payload, validate=True)
            plain = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(key_id)).decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise SecretBoxError(
                f"stored secret under key {key_id!r} failed authentication"
            ) from None
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        self._cache[stored] = plain
        return plain

    def needs_reseal(self, stored: str | None) -> bool:
        """True when ``stored`` is not sealed under the current key (plaintext, older key)."""
        if stored is None or self.current_key_id is None:
            return False
        return not stored.startswith(f"{PREFIX}{self.current_key_id}:")

    @staticmethod
    def key_id_of(stored: str) -> str | None:
        """The key id an envelope names; None for a plaintext row."""
        if not stored.startswith(PREFIX):
            return None
        return stored[len(PREFIX) :].partition(":")[0]


# Plaintext mode: what a repository uses when no box is passed in.
PLAINTEXT = SecretBox()
