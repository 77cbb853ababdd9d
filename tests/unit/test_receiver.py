"""The receiver toolkit against dispatcher's own signers, the independent ``standardwebhooks``
library and a plain hmac body check as a receiver would write it. No sockets: the handler and
the example app over real HTTP are in tests/integration/test_receiver_http.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from standardwebhooks.webhooks import Webhook

from dispatcher import receiver
from dispatcher.examples import receiver as example
from tests import signed

# --- Standard Webhooks -------------------------------------------------------------------


def test_dispatcher_signed_request_verifies() -> None:
    headers = signed.dispatcher_headers()
    receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)
    verified = receiver.Verifier(
        signed.NEW, signature_header=signed.HEADER, clock=lambda: signed.NOW
    ).verify(headers, signed.BODY)
    assert verified == receiver.Verified("msg_1", signed.NOW, body_hmac=True)


def test_library_signed_request_verifies() -> None:
    headers = signed.library_headers(signed.NEW, signed.BODY, "msg_lib", signed.NOW)
    receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)
    receiver.verify_standard([signed.THIRD, signed.NEW], headers, signed.BODY, now=signed.NOW)


def test_toolkit_accepted_request_also_passes_library_and_seed_snippet() -> None:
    timestamp = int(time.time())
    headers = signed.dispatcher_headers(timestamp=timestamp)
    receiver.Verifier(signed.NEW, signature_header=signed.HEADER).verify(headers, signed.BODY)
    assert Webhook(signed.NEW).verify(signed.BODY, headers) == json.loads(signed.BODY)
    assert signed.body_hmac_accepts(signed.NEW, signed.BODY, headers[signed.HEADER])


def test_header_lookup_is_case_insensitive() -> None:
    headers = {k.upper(): v for k, v in signed.dispatcher_headers().items()}
    receiver.Verifier(
        signed.NEW, signature_header=signed.HEADER.lower(), clock=lambda: signed.NOW
    ).verify(headers, signed.BODY)


def test_rotation_either_side() -> None:
    headers = signed.dispatcher_headers(secrets=(signed.NEW, signed.OLD), header_name=None)
    assert len(headers["webhook-signature"].split(" ")) == 2
    receiver.verify_standard(signed.OLD, headers, signed.BODY, now=signed.NOW)
    receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)
    receiver.verify_standard([signed.THIRD, signed.OLD], headers, signed.BODY, now=signed.NOW)
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_standard(signed.THIRD, headers, signed.BODY, now=signed.NOW)


def test_receiver_rotation_for_body_hmac() -> None:
    value = signed.dispatcher_headers(secrets=(signed.NEW, signed.OLD))[signed.HEADER]
    receiver.verify_body_hmac(signed.NEW, value, signed.BODY)
    receiver.verify_body_hmac([signed.OLD, signed.NEW], value, signed.BODY)
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_body_hmac(
            signed.OLD, value, signed.BODY
        )  # body-HMAC signs with the current one only


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda h, b: (h, b + b" "), id="tampered-body"),
        pytest.param(lambda h, b: ({**h, "webhook-id": "msg_2"}, b), id="tampered-id"),
        pytest.param(
            lambda h, b: ({**h, "webhook-timestamp": str(signed.NOW + 1)}, b), id="tampered-ts"
        ),
    ],
)
def test_tampering_is_rejected(
    mutate: Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]],
) -> None:
    headers, body = mutate(signed.dispatcher_headers(header_name=None), signed.BODY)
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_standard(signed.NEW, headers, body, now=signed.NOW)


def test_tampered_body_fails_body_hmac() -> None:
    value = signed.dispatcher_headers()[signed.HEADER]
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_body_hmac(signed.NEW, value, signed.BODY + b" ")


def test_wrong_secret_is_rejected() -> None:
    headers = signed.dispatcher_headers()
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_standard(signed.OLD, headers, signed.BODY, now=signed.NOW)
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_body_hmac(signed.OLD, headers[signed.HEADER], signed.BODY)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_missing_standard_headers(name: str, how: str) -> None:
    headers = signed.dispatcher_headers(header_name=None)
    if how == "absent":
        del headers[name]
    else:
        headers[name] = ""
    with pytest.raises(receiver.MissingHeaderError, match=name):
        receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)


def test_missing_body_hmac_header_when_configured() -> None:
    headers = signed.dispatcher_headers(header_name=None)
    verifier = receiver.Verifier(
        signed.NEW, signature_header=signed.HEADER, clock=lambda: signed.NOW
    )
    with pytest.raises(receiver.MissingHeaderError):
        verifier.verify(headers, signed.BODY)
    with pytest.raises(receiver.MissingHeaderError):
        receiver.verify_body_hmac(signed.NEW, None, signed.BODY)
    receiver.Verifier(signed.NEW, clock=lambda: signed.NOW).verify(
        headers, signed.BODY
    )  # not configured: fine


@pytest.mark.parametrize(
    ("offset", "match"),
    [(-301, "too old"), (301, "too new"), (-86_400, "too old"), (10**6, "too new")],
)
def test_timestamp_outside_tolerance(offset: int, match: str) -> None:
    headers = signed.dispatcher_headers(timestamp=signed.NOW + offset, header_name=None)
    with pytest.raises(receiver.TimestampError, match=match):
        receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_timestamp_within_tolerance(offset: int) -> None:
    headers = signed.dispatcher_headers(timestamp=signed.NOW + offset, header_name=None)
    receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)


def test_tolerance_is_configurable() -> None:
    headers = signed.dispatcher_headers(timestamp=signed.NOW - 60, header_name=None)
    with pytest.raises(receiver.TimestampError):
        receiver.verify_standard(
            signed.NEW, headers, signed.BODY, tolerance_seconds=30, now=signed.NOW
        )


@pytest.mark.parametrize(
    "value", ["abc", "1.5e9", "-5", " 1774700000", "\uff11\uff12\uff13", "9" * 40]
)
def test_malformed_timestamp(value: str) -> None:
    headers = {**signed.dispatcher_headers(header_name=None), "webhook-timestamp": value}
    with pytest.raises(receiver.TimestampError, match="unix seconds"):
        receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)


@pytest.mark.parametrize(
    "value",
    ["garbage", "v1,", "v1,!!!not-base64!!!", "v1,é", "v1a,AAAA", "v2," + "A" * 44, ","],
)
def test_malformed_signature_header(value: str) -> None:
    headers = {**signed.dispatcher_headers(header_name=None), "webhook-signature": value}
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)


def test_unknown_entries_beside_a_valid_signature_are_skipped() -> None:
    headers = signed.dispatcher_headers(header_name=None)
    headers["webhook-signature"] = "v1a,xyz garbage v1,%%% " + headers["webhook-signature"]
    receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)


@pytest.mark.parametrize(
    "value", ["", "sha1=abcd", "abcd", "sha256=", "sha256=zz", "sha256=ünï", "SHA256=00"]
)
def test_malformed_body_hmac_header(value: str) -> None:
    expected: type[receiver.VerificationError] = (
        receiver.MissingHeaderError if value == "" else receiver.InvalidSignatureError
    )
    with pytest.raises(expected):
        receiver.verify_body_hmac(signed.NEW, value, signed.BODY)


def test_exception_tree() -> None:
    for exc in (
        receiver.MissingHeaderError,
        receiver.InvalidSignatureError,
        receiver.TimestampError,
    ):
        assert issubclass(exc, receiver.VerificationError)
    assert issubclass(receiver.VerificationError, Exception)


def test_verifier_keeps_secrets_out_of_repr_and_rejects_bad_ones() -> None:
    verifier = receiver.Verifier([signed.NEW, signed.OLD], signature_header=signed.HEADER)
    assert signed.NEW not in repr(verifier)
    assert signed.OLD not in repr(verifier)
    with pytest.raises(ValueError, match="base64"):
        receiver.Verifier("whsec_not base64!")
    with pytest.raises(ValueError, match="secret"):
        receiver.Verifier([])
    with pytest.raises(ValueError, match="secret"):
        receiver.verify_standard("", signed.dispatcher_headers(), signed.BODY, now=signed.NOW)


# --- idempotency -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_store_remembers_and_forgets() -> None:
    store = receiver.MemoryIdempotencyStore()
    assert await store.seen_or_remember("a") is False
    assert await store.seen_or_remember("a") is True
    await store.forget("a")
    assert await store.seen_or_remember("a") is False


async def test_memory_store_is_bounded_lru() -> None:
    store = receiver.MemoryIdempotencyStore(max_entries=3)
    for key in "abc":
        assert await store.seen_or_remember(key) is False
    assert await store.seen_or_remember("a") is True  # touch: "b" is now the oldest
    assert await store.seen_or_remember("d") is False
    assert len(store) == 3
    assert "b" not in store
    assert "a" in store
    for i in range(1000):
        await store.seen_or_remember(f"id-{i}")
    assert len(store) == 3


async def test_memory_store_ttl_expiry() -> None:
    clock = FakeClock()
    store = receiver.MemoryIdempotencyStore(ttl_seconds=10, clock=clock)
    await store.seen_or_remember("a")
    clock.now += 5
    await store.seen_or_remember("b")
    clock.now += 5  # "a" expires exactly now
    assert await store.seen_or_remember("b") is True  # and "b" is refreshed
    assert "a" not in store
    assert await store.seen_or_remember("a") is False
    clock.now += 9.5
    assert await store.seen_or_remember("b") is True
    clock.now += 100
    assert await store.seen_or_remember("c") is False
    assert len(store) == 1


def test_memory_store_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        receiver.MemoryIdempotencyStore(max_entries=0)
    with pytest.raises(ValueError, match="ttl"):
        receiver.MemoryIdempotencyStore(ttl_seconds=0)


def test_postgres_store_rejects_unsafe_table_names() -> None:
    with pytest.raises(ValueError, match="identifier"):
        receiver.PostgresIdempotencyStore(None, table="receipts; DROP TABLE x")
    receiver.PostgresIdempotencyStore(None, table="app.webhook_receipts")


def test_summary_line_has_type_and_status_only() -> None:
    payload = {"event": "LEAD_QUALIFICATION_COMPLETE", "status": "COMPLETE", "results": ["x@y"]}
    line = example.summary_line(payload, {"webhook-id": "msg_9"})
    assert line == "event webhook_id=msg_9 type=LEAD_QUALIFICATION_COMPLETE status=COMPLETE"


def test_build_app_rejects_bad_fail_ratio() -> None:
    with pytest.raises(ValueError, match="fail_ratio"):
        example.build_app(signed.NEW, fail_ratio=1.5)


# --- exactly what was signed, and the boundaries --------------------------------------------


def test_zero_padded_timestamp_is_refused() -> None:
    """The signature covers the header's bytes; "0<ts>" was never signed."""
    headers = signed.dispatcher_headers(header_name=None)
    headers["webhook-timestamp"] = "0" + headers["webhook-timestamp"]
    with pytest.raises(receiver.TimestampError, match="unix seconds"):
        receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)


@pytest.mark.parametrize("how", ["upper", "space_before", "space_after", "sha512"])
def test_body_hmac_accepts_only_the_exact_lower_case_form(how: str) -> None:
    good = signed.dispatcher_headers()[signed.HEADER]
    receiver.verify_body_hmac(signed.NEW, good, signed.BODY)
    digits = good.removeprefix("sha256=")
    value = {
        "upper": "sha256=" + digits.upper(),
        "space_before": "sha256= " + digits,
        "space_after": good + " ",
        "sha512": "sha512=" + digits,
    }[how]
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_body_hmac(signed.NEW, value, signed.BODY)


def test_signature_entry_needs_the_v1_comma_form() -> None:
    headers = signed.dispatcher_headers(header_name=None)
    signature = headers["webhook-signature"]
    encoded = signature.removeprefix("v1,")
    for value in (encoded, "v1" + encoded, "v1;" + encoded, "v2," + encoded):
        with pytest.raises(receiver.InvalidSignatureError):
            receiver.verify_standard(
                signed.NEW, {**headers, "webhook-signature": value}, signed.BODY, now=signed.NOW
            )


def test_verify_standard_uses_the_clock_when_now_is_omitted() -> None:
    receiver.verify_standard(
        signed.NEW, signed.dispatcher_headers(timestamp=int(time.time())), signed.BODY
    )
    with pytest.raises(receiver.TimestampError, match="too old"):
        receiver.verify_standard(
            signed.NEW, signed.dispatcher_headers(timestamp=signed.NOW - 10_000_000), signed.BODY
        )


def test_plain_secret_verifies_the_body_hmac_and_needs_its_header() -> None:
    plain = "plain-text-secret-for-hmac"
    headers = signed.dispatcher_headers(secrets=(plain,))
    assert "webhook-signature" not in headers
    verified = receiver.Verifier(
        plain, signature_header=signed.HEADER, clock=lambda: signed.NOW
    ).verify(headers, signed.BODY)
    assert verified == receiver.Verified("msg_1", signed.NOW, body_hmac=True)
    with pytest.raises(ValueError, match="whsec_"):
        receiver.Verifier(plain)
    with pytest.raises(ValueError, match="whsec_"):
        receiver.verify_standard(plain, headers, signed.BODY, now=signed.NOW)


def test_every_secret_must_be_a_non_empty_string() -> None:
    for bad in (["", signed.NEW], [signed.NEW, ""]):
        with pytest.raises(ValueError, match="secret"):
            receiver.Verifier(bad)


def test_a_stray_character_in_a_signature_is_not_skipped() -> None:
    headers = signed.dispatcher_headers(header_name=None)
    encoded = headers["webhook-signature"].removeprefix("v1,")
    headers["webhook-signature"] = f"v1,{encoded[:10]}!{encoded[10:]}"
    with pytest.raises(receiver.InvalidSignatureError):
        receiver.verify_standard(signed.NEW, headers, signed.BODY, now=signed.NOW)


def test_memory_store_bounds_at_their_edges() -> None:
    receiver.MemoryIdempotencyStore(max_entries=1, ttl_seconds=0.5)
    with pytest.raises(ValueError, match="max_entries"):
        receiver.MemoryIdempotencyStore(max_entries=0)
    with pytest.raises(ValueError, match="ttl_seconds"):
        receiver.MemoryIdempotencyStore(ttl_seconds=0)


async def test_forgetting_an_unknown_id_is_harmless() -> None:
    store = receiver.MemoryIdempotencyStore()
    await store.forget("never-seen")
    assert await store.begin("never-seen") is receiver.Claim.NEW


def test_postgres_store_settings() -> None:
    # No database needed to check what the constructor keeps (tests/integration uses it).
    store = receiver.PostgresIdempotencyStore(None, processing_seconds=0.5)  # type: ignore[arg-type]
    assert (store.table, store.processing_seconds) == ("webhook_receipts", 0.5)
    with pytest.raises(ValueError, match="processing_seconds"):
        receiver.PostgresIdempotencyStore(None, processing_seconds=0)  # type: ignore[arg-type]
