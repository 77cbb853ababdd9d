"""Secrets at rest: AEAD envelopes with a key id per row, rotation, plaintext migration."""

from __future__ import annotations

import base64

import pytest

from dispatcher import config, secretbox
from dispatcher.cli import context

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
K1 = base64.b64encode(bytes(range(32))).decode()
K2 = base64.b64encode(bytes(range(32, 64))).decode()


def box(spec: str) -> secretbox.SecretBox:
    return secretbox.SecretBox.from_spec(spec)


def test_seal_then_open_round_trips_and_names_the_key() -> None:
    b = box(f"k1:{K1}")
    stored = b.seal(SECRET)
    assert stored.startswith("enc:v1:k1:")
    assert SECRET not in stored
    assert SECRET[6:] not in stored  # not even the base64 body of the secret
    assert b.open(stored) == SECRET
    assert secretbox.SecretBox.key_id_of(stored) == "k1"


def test_every_seal_uses_a_fresh_nonce() -> None:
    b = box(f"k1:{K1}")
    assert b.seal(SECRET) != b.seal(SECRET)


def test_plaintext_rows_stay_readable_and_are_flagged_for_resealing() -> None:
    b = box(f"k1:{K1}")
    assert b.open(SECRET) == SECRET
    assert b.needs_reseal(SECRET)
    assert not b.needs_reseal(b.seal(SECRET))
    assert not b.needs_reseal(None)


def test_without_keys_secrets_are_stored_as_they_are() -> None:
    b = box("")
    assert not b.encrypting
    assert b.seal(SECRET) == SECRET
    assert not b.needs_reseal(SECRET)
    with pytest.raises(secretbox.SecretBoxError):
        b.seal("enc:v1:looks-like-an-envelope")


def test_rotation_old_rows_open_with_the_old_key_new_rows_use_the_new_one() -> None:
    old = box(f"k1:{K1}")
    stored_old = old.seal(SECRET)
    rotated = box(f"k2:{K2},k1:{K1}")
    assert rotated.open(stored_old) == SECRET
    assert rotated.needs_reseal(stored_old)
    resealed = rotated.seal(rotated.open(stored_old))
    assert resealed.startswith("enc:v1:k2:")
    after = box(f"k2:{K2}")  # old key dropped after `secrets reencrypt`
    assert after.open(resealed) == SECRET
    with pytest.raises(secretbox.SecretBoxError, match=r"'k1'.*not configured"):
        after.open(stored_old)


def test_tampering_and_relabelling_fail_authentication_without_leaking() -> None:
    b = box(f"k1:{K1},k2:{K1}")  # same key material under two ids
    stored = b.seal(SECRET)
    raw = bytearray(base64.b64decode(stored.split(":", 3)[3]))
    raw[-1] ^= 1
    tampered = "enc:v1:k1:" + base64.b64encode(bytes(raw)).decode()
    relabelled = stored.replace("enc:v1:k1:", "enc:v1:k2:")
    for bad in (tampered, relabelled, "enc:v1:k1:not base64!", "enc:v1:nokeyid"):
        with pytest.raises(secretbox.SecretBoxError) as info:
            b.open(bad)
        assert SECRET not in str(info.value)
        assert K1 not in str(info.value)


def test_the_cache_returns_the_same_plaintext_and_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(secretbox, "CACHE_ENTRIES", 3)
    b = box(f"k1:{K1}")
    sealed = [b.seal(f"{SECRET}{i}") for i in range(5)]
    for _ in range(2):
        assert [b.open(s) for s in sealed] == [f"{SECRET}{i}" for i in range(5)]
    assert len(b._cache) <= 3
    # Exactly full: the next new entry empties the cache first, so it never exceeds the bound.
    fresh = box(f"k1:{K1}")
    for s in sealed[:3]:
        fresh.open(s)
    assert len(fresh._cache) == 3
    fresh.open(sealed[3])
    assert list(fresh._cache) == [sealed[3]]


@pytest.mark.parametrize(
    "spec",
    [
        "k1",  # no key
        "k1:",  # empty key
        f"k1:{K1[:-8]}",  # short key
        f"k1:{K1},k1:{K2}",  # duplicate id
        f"bad id:{K1}",
        "k1:!!!notbase64!!!",
        f":{K1}",  # empty key id
        f"k1:{K1[:20]}!{K1[20:]}",  # a stray character is refused, not skipped
        f"k1:{K1[:20]} {K1[20:]}",
    ],
)
def test_bad_key_specs_are_refused_without_echoing_the_key(spec: str) -> None:
    with pytest.raises(secretbox.SecretBoxError) as info:
        box(spec)
    assert K1 not in str(info.value)
    assert K2 not in str(info.value)


def test_keys_never_show_in_repr_or_settings_repr() -> None:
    spec = f"k1:{K1}"
    assert K1 not in repr(box(spec))
    settings = config.Settings(secret_keys=spec)
    assert K1 not in repr(settings)


def test_cli_reads_the_keys_and_rejects_bad_ones() -> None:
    env = {"DISPATCHER_SECRET_KEYS": f"k2:{K2}, k1:{K1}"}
    assert context.Context.from_env(env).secret_box().current_key_id == "k2"
    assert (
        context.Context.from_env(env).settings("postgresql://x/y").secret_keys
        == env["DISPATCHER_SECRET_KEYS"]
    )
    with pytest.raises(context.CliError, match="DISPATCHER_SECRET_KEYS"):
        context.Context.from_env({"DISPATCHER_SECRET_KEYS": "k1:short"}).settings(
            "postgresql://x/y"
        )


def test_generated_keys_are_usable() -> None:
    b = box(f"new:{secretbox.generate_key()}")
    assert b.open(b.seal(SECRET)) == SECRET


# A ciphertext sealed once, by hand, with AES-GCM under FIXED_KEY and nonce 00..0b: the stored
# format (prefix, key id, nonce length, AAD) must keep opening it.
FIXED_KEY = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM="
FIXED_SEALED = (
    "enc:v1:fixed:AAECAwQFBgcICQoL6MNLKd4SqofyZPDl5vbp24djWOhZLqNApGCMfyvG0hNjqsof60/QcZNfg5I="
)


def test_a_known_ciphertext_still_opens() -> None:
    box = secretbox.SecretBox.from_spec(f"fixed:{FIXED_KEY}")
    assert box.open(FIXED_SEALED) == "whsec_known-plaintext-secret"
    assert secretbox.SecretBox.key_id_of(FIXED_SEALED) == "fixed"


def test_empty_elements_in_a_key_spec_drop_nothing() -> None:
    sealed_k2 = secretbox.SecretBox.from_spec(f"k2:{K2}").seal("whsec_x")
    box = secretbox.SecretBox.from_spec(f",k1:{K1},,k2:{K2},")
    assert box.current_key_id == "k1"
    assert box.open(sealed_k2) == "whsec_x"


def test_url_safe_and_unpadded_keys_are_the_same_key() -> None:
    raw = bytes([0xFB, 0xFF, 0xBF] * 10 + [0xFE, 0xFF])  # encodes with + and / (- and _)
    standard = base64.b64encode(raw).decode()
    url_safe = base64.urlsafe_b64encode(raw).decode()
    assert "+" in standard
    assert "/" in standard
    assert standard.endswith("=")
    sealed = secretbox.SecretBox.from_spec(f"k:{standard}").seal("whsec_y")
    for spelling in (url_safe, url_safe.rstrip("="), standard.rstrip("=")):
        assert secretbox.SecretBox.from_spec(f"k:{spelling}").open(sealed) == "whsec_y"


def test_a_stray_character_in_a_stored_secret_fails_authentication() -> None:
    b = box(f"k1:{K1}")
    sealed = b.seal(SECRET)
    head, payload = sealed.rsplit(":", 1)
    with pytest.raises(secretbox.SecretBoxError, match="failed authentication"):
        b.open(f"{head}:{payload[:10]}!{payload[10:]}")
