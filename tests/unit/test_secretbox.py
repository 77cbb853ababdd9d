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


@pytest.mark.parametrize(
    "spec",
    [
        "k1",  # no key
        "k1:",  # empty key
        f"k1:{K1[:-8]}",  # short key
        f"k1:{K1},k1:{K2}",  # duplicate id
        f"bad id:{K1}",
        "k1:!!!notbase64!!!",
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
