"""Third-party signers: a plugin distribution written to disk and put on sys.path registers
through the ``dispatcher.signers`` entry-point group."""

from __future__ import annotations

import hashlib
import sys
import textwrap
from pathlib import Path

import pytest

from dispatcher import signing


def test_third_party_signer_registers_through_an_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin distribution on sys.path with a ``dispatcher.signers`` entry point is picked up
    by name without touching dispatcher's code."""
    (tmp_path / "acme_signer.py").write_text(
        textwrap.dedent("""
        import hashlib

        class AcmeSigner:
            name = "acme"

            def headers(self, item):
                return {"X-Acme-Digest": hashlib.sha256(item.body).hexdigest()}
    """)
    )
    dist = tmp_path / "acme_signer-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-signer\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dispatcher.signers]\nacme = acme_signer:AcmeSigner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = signing.SignerRegistry.load()
    assert "acme" in registry.names()
    signers = registry.for_subscription(None, ("acme",))
    item = signing.SigningInput(
        "msg_1", 1_774_700_000, b'{"event": "x", "n": 1}', (signing.generate_secret(),), None
    )
    headers = signing.sign(signers, item)
    assert headers["X-Acme-Digest"] == hashlib.sha256(b'{"event": "x", "n": 1}').hexdigest()
    assert "webhook-signature" in headers
    sys.modules.pop("acme_signer", None)
