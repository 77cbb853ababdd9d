"""HTTPS deliveries against real TLS servers on 127.0.0.1 with throwaway CAs (trustme).

The chain and the host name are verified while the SSRF guard pins the connection to a checked
address: the URL names a host that only the guard's resolver knows, SNI carries that name, and
a private CA is trusted through OpenSSL's ``SSL_CERT_FILE``. Wrong-host, expired, self-signed
and unknown-CA certificates fail as ``tls_error`` and are retried with backoff.
"""

from __future__ import annotations

import datetime
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import dispatcher
from dispatcher import ssrf
from dispatcher.db import repository
from tests import support

HOST = "hooks.example.test"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> support.StaticResolver:
    static = support.StaticResolver({HOST: ["127.0.0.1"]})
    real = ssrf.build_connector_resolver
    monkeypatch.setattr(
        ssrf, "build_connector_resolver", lambda policy, inner=None: real(policy, static)
    )
    return static


@pytest.fixture
def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A throwaway CA, trusted the OpenSSL way (SSL_CERT_FILE) by dispatchers started after."""
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    return authority


def _server_context(cert: trustme.LeafCert, seen_sni: list[str | None]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)

    def record(_sock: Any, name: str | None, _ctx: Any) -> None:
        seen_sni.append(name)

    ctx.sni_callback = record
    return ctx


def _self_signed(host: str, tmp_path: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "self.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pem))
    return ctx


@pytest.fixture
async def tls_receivers() -> AsyncIterator[Any]:
    made: list[support.Receiver] = []

    async def make(ctx: ssl.SSLContext, host: str = HOST) -> support.Receiver:
        r = await support.Receiver(tls=ctx, host=host).start()
        made.append(r)
        return r

    yield make
    for r in made:
        await r.stop()


async def _subscribe(pool: Any, url: str) -> str:
    sub = await repository.Repository(pool).create_subscription(
        url=url, event_types=["t.*"], secret=SECRET
    )
    return str(sub["id"])


async def _publish(pool: Any, n: int = 1) -> None:
    async with pool.acquire() as conn:
        for i in range(n):
            await dispatcher.publish(conn, "t.x", {"n": i})


async def _attempts(pool: Any, sid: str) -> list[tuple[str, str | None]]:
    rows = await pool.fetch(
        "SELECT a.outcome, a.error FROM webhook_attempts a "
        "JOIN webhook_deliveries d ON d.id = a.delivery_id "
        "WHERE d.subscription_id = $1::uuid ORDER BY a.id",
        sid,
    )
    return [(r["outcome"], r["error"]) for r in rows]


async def test_https_delivery_verifies_chain_and_host_through_the_pinned_address(
    pool: Any,
    ca: trustme.CA,
    dns: support.StaticResolver,
    tls_receivers: Any,
    start_dispatcher: Any,
) -> None:
    sni: list[str | None] = []
    rx = await tls_receivers(_server_context(ca.issue_cert(HOST), sni))
    sid = await _subscribe(pool, rx.url)
    await _publish(pool, 3)
    await start_dispatcher()
    await support.wait_for(lambda: len(rx.ok()) == 3, message="3 HTTPS deliveries")
    # The name went through the guard's resolver; TLS named the URL's host, not the address.
    assert HOST in dns.asked
    assert set(sni) == {HOST}
    await support.wait_for(lambda: _attempts(pool, sid), message="attempts logged", timeout=10)
    assert {o for o, _e in await _attempts(pool, sid)} == {"success"}


def _expired(ca: trustme.CA) -> trustme.LeafCert:
    now = datetime.datetime.now(datetime.UTC)
    return ca.issue_cert(
        HOST,
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("wrong_host", "Hostname mismatch"),
        ("expired", "expired"),
        ("self_signed", "self-signed"),
        ("unknown_ca", "unable to get local issuer"),
    ],
)
async def test_bad_certificate_is_a_tls_error_retried_with_backoff(  # noqa: PLR0917 (fixtures)
    pool: Any,
    ca: trustme.CA,
    dns: support.StaticResolver,
    tls_receivers: Any,
    start_dispatcher: Any,
    tmp_path: Path,
    kind: str,
    needle: str,
) -> None:
    sni: list[str | None] = []
    if kind == "wrong_host":
        ctx = _server_context(ca.issue_cert("other.example.test"), sni)
    elif kind == "expired":
        ctx = _server_context(_expired(ca), sni)
    elif kind == "self_signed":
        ctx = _self_signed(HOST, tmp_path)
    else:
        ctx = _server_context(trustme.CA().issue_cert(HOST), sni)
    rx = await tls_receivers(ctx)
    sid = await _subscribe(pool, rx.url)
    await _publish(pool)
    running = await start_dispatcher()

    async def retried() -> bool:
        return len(await _attempts(pool, sid)) >= 3

    await support.wait_for(retried, timeout=20, message="three failed attempts")
    attempts = await _attempts(pool, sid)
    assert {o for o, _e in attempts} == {"tls_error"}
    assert all(e is not None and needle in e for _o, e in attempts), attempts
    state = await pool.fetchval(
        "SELECT state FROM webhook_deliveries WHERE subscription_id = $1::uuid", sid
    )
    assert state in {"retrying", "in_flight"}
    assert rx.requests == []
    text = prometheus_client.generate_latest(running.dispatcher.registry).decode()
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dispatcher_attempts_total{")
        and f'subscription="{sid}"' in line
        and 'outcome="tls_error"' in line
    ]
    assert counted
    assert counted[0] >= 3


async def test_https_only_end_to_end(
    pool: Any, dsn: str, ca: trustme.CA, tls_receivers: Any, tmp_path: Path
) -> None:
    """The real CLI and ``dispatcher run`` with DISPATCHER_HTTPS_ONLY=true: http is refused
    at creation, a clear-text row written behind the validation's back is blocked at the
    attempt, and https is delivered with the private CA from SSL_CERT_FILE."""
    sni: list[str | None] = []
    secure = await tls_receivers(_server_context(ca.issue_cert("localhost"), sni), "localhost")
    plain = await support.Receiver().start()
    try:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")},
            "DATABASE_URL": dsn,
            "DISPATCHER_ALLOW_CIDRS": "127.0.0.1/32",
            "DISPATCHER_HTTPS_ONLY": "true",
        }

        def add(url: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dispatcher",
                    "subscriptions",
                    "add",
                    "--url",
                    url,
                    "--event-type",
                    "t.*",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        refused = add(plain.url)
        assert refused.returncode == 2, refused.stderr
        assert "only https" in refused.stderr
        assert "Traceback" not in refused.stderr
        accepted = add(secure.url)
        assert accepted.returncode == 0, accepted.stderr
        sneaked = await _subscribe(pool, plain.url)
        await _publish(pool, 2)
        log = tmp_path / "run.log"
        proc = support.spawn_dispatcher(
            dsn,
            extra_env={
                "DISPATCHER_HTTPS_ONLY": "true",
                "SSL_CERT_FILE": os.environ["SSL_CERT_FILE"],
            },
            log_path=log,
        )
        try:

            async def settled() -> bool:
                blocked = await pool.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE subscription_id = $1::uuid "
                    "AND state = 'dead'",
                    sneaked,
                )
                return proc.poll() is not None or (len(secure.ok()) == 2 and blocked == 2)

            await support.wait_for(settled, timeout=30, message="https delivered, http blocked")
            assert proc.poll() is None, log.read_text()[-2000:]
            assert plain.requests == []
            assert set(sni) == {"localhost"}
            outcomes = {o for o, _e in await _attempts(pool, sneaked)}
            assert outcomes == {"blocked"}
        finally:
            proc.terminate()
            proc.wait(20)
    finally:
        await plain.stop()
