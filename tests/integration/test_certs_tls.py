"""Issued certificates against real tools: openssl, and Mosquitto with require_certificate."""

from __future__ import annotations

import ssl
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion

from certs import Bundle, Pki, Role
from tests.fixtures.mosquitto import MosquittoProcess
from tests.fixtures.pki import TestPki
from tests.fixtures.prereq import require_binary

pytestmark = pytest.mark.integration


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("openssl"), *args], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("name", ["device", "operator", "service", "admin", "server"])
def test_openssl_accepts_the_chain(test_pki: TestPki, name: str) -> None:
    bundle: Bundle = getattr(test_pki, name)
    out = _openssl("verify", "-CAfile", str(bundle.ca), str(bundle.cert))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(": OK")


def test_openssl_crl_check_rejects_the_revoked_certificate(test_pki: TestPki) -> None:
    crl = str(test_pki.pki.crl_path)
    ca = str(test_pki.pki.ca_cert_path)
    good = _openssl(
        "verify", "-crl_check", "-CAfile", ca, "-CRLfile", crl, str(test_pki.device.cert)
    )
    assert good.returncode == 0, good.stderr
    bad = _openssl(
        "verify", "-crl_check", "-CAfile", ca, "-CRLfile", crl, str(test_pki.revoked.cert)
    )
    assert bad.returncode != 0
    assert "certificate revoked" in bad.stdout + bad.stderr


def test_openssl_refuses_every_certificate_on_a_stale_crl_until_renewed(tmp_path: Path) -> None:
    """What both brokers do past the CRL's nextUpdate (why it must be renewed in time)."""
    pki = Pki(tmp_path / "pki")
    pki.init_ca()
    good = pki.issue("dev-fresh", tenant="acme", role=Role.DEVICE)
    gone_bundle = pki.issue("dev-gone", tenant="acme", role=Role.DEVICE)
    gone = pki.revoke("dev-gone")
    stale = pki.renew_crl(days=1 / 86400)
    assert stale.next_update is not None
    while datetime.now(UTC) <= stale.next_update:
        time.sleep(0.05)
    args = ("verify", "-crl_check", "-CAfile", str(pki.ca_cert_path), "-CRLfile")
    out = _openssl(*args, str(pki.crl_path), str(good.cert))
    assert out.returncode != 0
    assert "CRL has expired" in out.stdout + out.stderr
    renewed = pki.renew_crl()
    assert renewed.serials == {gone.serial}
    assert _openssl(*args, str(pki.crl_path), str(good.cert)).returncode == 0
    revoked = _openssl(*args, str(pki.crl_path), str(gone_bundle.cert))
    assert "certificate revoked" in revoked.stdout + revoked.stderr


def test_openssl_rejects_expired_and_wrong_ca(test_pki: TestPki) -> None:
    ca = str(test_pki.pki.ca_cert_path)
    expired = _openssl("verify", "-CAfile", ca, str(test_pki.expired.cert))
    assert "certificate has expired" in expired.stdout + expired.stderr
    wrong = _openssl("verify", "-CAfile", ca, str(test_pki.wrong_ca.cert))
    assert wrong.returncode != 0


def test_der_files_load_with_ssl_and_cryptography(test_pki: TestPki) -> None:
    bundle = test_pki.device
    cert = x509.load_der_x509_certificate(bundle.cert_der.read_bytes())
    assert cert == x509.load_pem_x509_certificate(bundle.cert.read_bytes())
    key = serialization.load_der_private_key(bundle.key_der.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no system CAs: count only ours
    context.load_verify_locations(cadata=bundle.ca_der.read_bytes())
    assert context.cert_store_stats()["x509_ca"] == 1


class _Client:
    """A paho-mqtt 2 client with a client certificate; records what it saw."""

    def __init__(self, broker: MosquittoProcess, bundle: Bundle | None, ca: Path) -> None:
        self.connected = threading.Event()
        self.done = threading.Event()
        self.reason: object = None
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        client_id = bundle.identity.id if bundle else f"anon-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.tls_set(
            ca_certs=str(ca),
            certfile=str(bundle.cert) if bundle else None,
            keyfile=str(bundle.key) if bundle else None,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.append((msg.topic, msg.payload))
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.broker = broker

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        self.reason = reason
        if not getattr(reason, "is_failure", True):
            self.connected.set()
        self.done.set()

    def connect(self, timeout: float = 5.0) -> bool:
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        except (ssl.SSLError, OSError):
            return False
        self.client.loop_start()
        self.done.wait(timeout)
        return self.connected.is_set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client.reinitialise()  # closes its socket pair now (paho#627)


def test_device_bundle_connects_and_its_message_arrives(
    mosquitto: MosquittoProcess, test_pki: TestPki
) -> None:
    watcher = _Client(mosquitto, test_pki.operator, test_pki.pki.ca_cert_path)
    device = _Client(mosquitto, test_pki.device, test_pki.pki.ca_cert_path)
    try:
        assert watcher.connect()
        watcher.client.subscribe("fl/acme/#", qos=1)
        assert watcher.subscribed.wait(5)
        assert device.connect()
        info = device.client.publish("fl/acme/dev-1/telemetry", b'{"metrics":{"t":1}}', qos=1)
        info.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not watcher.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.messages == [("fl/acme/dev-1/telemetry", b'{"metrics":{"t":1}}')]
    finally:
        watcher.close()
        device.close()


@pytest.mark.parametrize("name", ["expired", "revoked", "wrong_ca", None])
def test_bad_certificates_never_get_in(
    mosquitto: MosquittoProcess, test_pki: TestPki, name: str | None
) -> None:
    watcher = _Client(mosquitto, test_pki.operator, test_pki.pki.ca_cert_path)
    bundle = getattr(test_pki, name) if name else None
    attacker = _Client(mosquitto, bundle, test_pki.pki.ca_cert_path)
    try:
        assert watcher.connect()
        watcher.client.subscribe("fl/#", qos=1)
        assert watcher.subscribed.wait(5)
        assert not attacker.connect(timeout=3)
        # whatever it tried to send, nothing reached a subscriber
        attacker.client.publish("fl/acme/dev-1/telemetry", b"x", qos=0)
        time.sleep(0.3)
        assert watcher.messages == []
    finally:
        watcher.close()
        attacker.client.loop_stop()
        attacker.client.reinitialise()  # closes its socket pair now (paho#627)
    assert "OpenSSL Error" in mosquitto.log_tail(50) or "protocol error" in mosquitto.log_tail(50)
