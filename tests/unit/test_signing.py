"""Signers checked by independent verifiers, secret handling, and the plugin registry."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

import pytest
import standardwebhooks

from dispatcher import signing
from dispatcher.signing import body_hmac, standard


def _item(secrets: tuple[str, ...], header: str | None = None) -> signing.SigningInput:
    return signing.SigningInput(
        msg_id="msg_1",
        timestamp=int(datetime.now(UTC).timestamp()),
        body=b'{"event": "x", "n": 1}',
        secrets=secrets,
        header_name=header,
    )


def test_standard_webhooks_verified_by_the_public_library() -> None:
    secret = signing.generate_secret()
    item = _item((secret,))
    headers = standard.StandardWebhooksSigner().headers(item)
    payload = standardwebhooks.Webhook(secret).verify(item.body, headers)
    assert payload == {"event": "x", "n": 1}


def test_each_secret_in_rotation_verifies_alone() -> None:
    new, old = signing.generate_secret(), signing.generate_secret()
    item = _item((new, old))
    headers = standard.StandardWebhooksSigner().headers(item)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        standardwebhooks.Webhook(secret).verify(item.body, headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(signing.generate_secret()).verify(item.body, headers)


def test_body_hmac_matches_the_seed_receiver_snippet() -> None:
    secret = signing.generate_secret()
    item = _item((secret,), header="X-AgentX-Signature")
    headers = body_hmac.BodyHmacSigner().headers(item)
    expected = hmac.new(secret.encode("utf-8"), item.body, hashlib.sha256).hexdigest()
    value = headers["X-AgentX-Signature"]
    assert value.startswith("sha256=")
    assert hmac.compare_digest(value[len("sha256=") :], expected)


def test_body_hmac_needs_a_header_name() -> None:
    with pytest.raises(signing.SigningError):
        body_hmac.BodyHmacSigner().headers(_item((signing.generate_secret(),)))


def test_generated_secrets_are_whsec_with_24_random_bytes() -> None:
    a, b = signing.generate_secret(), signing.generate_secret()
    assert a != b
    assert a.startswith("whsec_")
    assert len(signing.secret_key_bytes(a)) == 24


@pytest.mark.parametrize("bad", ["short", "whsec_not*base64!!!!!!!!", "whsec_AAAA"])
def test_weak_or_malformed_secrets_are_rejected(bad: str) -> None:
    with pytest.raises(signing.SigningError):
        signing.validate_secret(bad)


def test_signing_input_repr_hides_secrets() -> None:
    secret = signing.generate_secret()
    assert secret not in repr(_item((secret,)))


def test_registry_selection_per_subscription() -> None:
    registry = signing.SignerRegistry.load()
    assert [s.name for s in registry.for_subscription(None, ())] == ["standard-webhooks"]
    assert [s.name for s in registry.for_subscription("X-Sig", ())] == [
        "standard-webhooks",
        "body-hmac",
    ]
    with pytest.raises(signing.SigningError, match="unknown signer"):
        registry.for_subscription(None, ("nope",))


def test_minimum_secret_and_key_lengths_are_exact() -> None:
    import base64

    signing.validate_secret("p" * 16)
    with pytest.raises(signing.SigningError, match="16 characters"):
        signing.validate_secret("p" * 15)
    signing.validate_secret("whsec_" + base64.b64encode(b"k" * 16).decode())
    with pytest.raises(signing.SigningError, match="16 bytes"):
        signing.validate_secret("whsec_" + base64.b64encode(b"k" * 15).decode())


def test_standard_secrets_need_the_prefix_and_base64() -> None:
    assert signing.secret_key_bytes("whsec_" + "QUJDRA==") == b"ABCD"
    for bad in ("QUJDRA==", "plain-text-secret-for-hmac", "whsec_not base64!"):
        with pytest.raises(signing.SigningError):
            signing.secret_key_bytes(bad)


def test_one_rule_for_what_a_secret_signs() -> None:
    whsec = signing.generate_secret()
    signing.check_secret_scheme(whsec, None)
    signing.check_secret_scheme(whsec, "X-Sig")
    signing.check_secret_scheme("plain-text-secret-for-hmac", "X-Sig")
    with pytest.raises(signing.SigningError, match="whsec_"):
        signing.check_secret_scheme("plain-text-secret-for-hmac", None)
    with pytest.raises(signing.SigningError, match="whsec_"):
        signing.check_secret_scheme("plain-text-secret-for-hmac", "")
    # The standard signer never sends an unsigned request, and skips plain secrets.
    signer = standard.StandardWebhooksSigner()
    with pytest.raises(signing.SigningError):
        signer.headers(signing.SigningInput("m", 1, b"{}", ("plain-text-secret-for-hmac",)))
    only_ids = signer.headers(
        signing.SigningInput("m", 1, b"{}", ("plain-text-secret-for-hmac",), "X-Sig")
    )
    assert only_ids == {"webhook-id": "m", "webhook-timestamp": "1"}
    mixed = signer.headers(
        signing.SigningInput("m", 1, b"{}", ("plain-text-secret-for-hmac", whsec), "X-Sig")
    )
    assert mixed["webhook-signature"].count("v1,") == 1


def test_lenient_base64_is_not_a_standard_secret() -> None:
    with pytest.raises(signing.SigningError, match="base64"):
        signing.secret_key_bytes("whsec_QUJD RA==")
    with pytest.raises(signing.SigningError, match="base64"):
        signing.secret_key_bytes("whsec_QUJD!RA==")


def test_registry_keeps_the_signers_it_is_given() -> None:
    signer = body_hmac.BodyHmacSigner()
    assert signing.SignerRegistry({"mine": signer}).get("mine") is signer
    assert {"standard-webhooks", "body-hmac"} <= set(signing.SignerRegistry.load().names())


def test_kept_keys_sign_each_message_afresh_and_a_rotated_secret_at_once() -> None:
    # Signers keep keyed HMAC states per secret: repeated use must not carry one message into
    # the next, and a new secret string must sign with its own key from its first use.
    signer = standard.StandardWebhooksSigner()
    first, second = signing.generate_secret(), signing.generate_secret()
    for secret in (first, first, second, first):
        item = _item((secret,), header="X-AgentX-Signature")
        headers = signer.headers(item) | body_hmac.BodyHmacSigner().headers(item)
        standardwebhooks.Webhook(secret).verify(item.body, headers)
        expected = hmac.new(secret.encode(), item.body, hashlib.sha256).hexdigest()
        assert headers["X-AgentX-Signature"] == "sha256=" + expected
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(first).verify(item.body, signer.headers(_item((second,))))


def test_kept_keys_are_bounded_refuse_bad_secrets_each_time_and_never_show() -> None:
    macs = signing.KeyedMacs(signing.secret_key_bytes, max_entries=2)
    secrets = [signing.generate_secret() for _ in range(3)]
    for secret in secrets:
        macs.new(secret)
    assert repr(macs) == "KeyedMacs(1 keys)"  # cleared when full, then the third one kept
    assert not any(s in repr(macs) or s[6:] in repr(macs) for s in secrets)
    for _ in range(2):
        with pytest.raises(signing.SigningError):
            macs.new("whsec_not base64!")
