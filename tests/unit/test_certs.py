"""The PKI with real cryptography: identities, extensions, file modes, revocation, verification."""

from __future__ import annotations

import json
import os
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from certs import Identity, KeyType, Pki, Role
from certs.cli import app
from certs.errors import (
    AlreadyExistsError,
    CertsError,
    InvalidIdentityError,
    NoCaError,
    PassphraseError,
    UnknownIdentityError,
)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    authority = Pki(tmp_path / "pki")
    authority.init_ca()
    return authority


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_identity_fields_and_extensions(pki: Pki) -> None:
    bundle = pki.issue("dev-1", tenant="acme", role=Role.DEVICE)
    cert = _cert(bundle.cert)
    assert Identity.from_certificate(cert) == Identity("dev-1", "acme", Role.DEVICE)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:fieldline:acme:device:dev-1"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(_cert(pki.ca_cert_path))
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_server_certificate_has_dns_and_ip_names(pki: Pki) -> None:
    bundle = pki.issue_server("broker", hosts=["localhost", "mqtt.plant"], ips=["127.0.0.1"])
    cert = _cert(bundle.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "mqtt.plant"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(CertsError, match="not an IP address"):
        pki.issue_server("b2", ips=["localhost"])


def test_rsa_keys(tmp_path: Path) -> None:
    authority = Pki(tmp_path / "rsa")
    authority.init_ca(key_type=KeyType.RSA_2048)
    ca = _cert(authority.ca_cert_path).public_key()
    assert isinstance(ca, rsa.RSAPublicKey)
    assert ca.key_size == 2048
    bundle = authority.issue("dev-1", tenant="acme", role=Role.DEVICE, key_type=KeyType.RSA_2048)
    usage = _cert(bundle.cert).extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_encipherment


def test_file_modes(pki: Pki) -> None:
    bundle = pki.issue("dev-1", tenant="acme", role=Role.DEVICE)
    assert stat.S_IMODE(os.stat(pki.root).st_mode) == 0o700
    for key in (bundle.key, bundle.key_der, pki.ca_key_path):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
    assert stat.S_IMODE(os.stat(bundle.directory).st_mode) == 0o700


def test_ca_passphrase(tmp_path: Path) -> None:
    authority = Pki(tmp_path / "p")
    authority.init_ca(passphrase="correct horse")
    assert b"ENCRYPTED" in authority.ca_key_path.read_bytes()
    with pytest.raises(PassphraseError, match="encrypted"):
        authority.issue("dev-1", tenant="acme", role=Role.DEVICE)
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        authority.issue("dev-1", tenant="acme", role=Role.DEVICE, ca_passphrase="nope")
    bundle = authority.issue(
        "dev-1", tenant="acme", role=Role.DEVICE, ca_passphrase="correct horse"
    )
    assert authority.verify(bundle.cert).ok


def test_refuses_to_overwrite_without_force(pki: Pki) -> None:
    with pytest.raises(AlreadyExistsError, match="--force"):
        pki.init_ca()
    first = pki.issue("dev-1", tenant="acme", role=Role.DEVICE)
    # ids are unique across tenants: the MQTT client id is the CN
    with pytest.raises(AlreadyExistsError, match="unique across tenants"):
        pki.issue("dev-1", tenant="globex", role=Role.DEVICE)
    second = pki.issue("dev-1", tenant="acme", role=Role.DEVICE, force=True)
    assert second.serial != first.serial
    assert pki.is_revoked(first.serial)
    assert not pki.is_revoked(second.serial)
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(first.serial) is not None


def test_force_init_ca_starts_over(pki: Pki) -> None:
    pki.issue("dev-1", tenant="acme", role=Role.DEVICE)
    pki.init_ca(force=True)
    assert pki.records() == []
    with pytest.raises(UnknownIdentityError):
        pki.bundle("dev-1")


@pytest.mark.parametrize(
    ("ident", "tenant", "fragment"),
    [
        ("Dev-1", "acme", "id 'Dev-1'"),
        ("dev/1", "acme", "'/'"),
        ("dev-1", "ac+me", "'+'"),
        ("", "acme", "empty"),
        ("d" * 65, "acme", "65"),
        ("dev-1", "", "tenant id"),
    ],
)
def test_bad_ids(pki: Pki, ident: str, tenant: str, fragment: str) -> None:
    with pytest.raises(InvalidIdentityError) as info:
        pki.issue(ident, tenant=tenant, role=Role.DEVICE)
    assert fragment in str(info.value)


def test_server_role_is_not_a_client_role(pki: Pki) -> None:
    with pytest.raises(InvalidIdentityError, match="certs server"):
        pki.issue("x", tenant="acme", role=Role.SERVER)


def test_revoke_by_id_and_by_serial(pki: Pki) -> None:
    a = pki.issue("dev-a", tenant="acme", role=Role.DEVICE)
    b = pki.issue("dev-b", tenant="acme", role=Role.DEVICE)
    c = pki.issue("dev-c", tenant="acme", role=Role.DEVICE)
    pki.revoke("dev-a")
    pki.revoke(f"{b.serial:x}")
    pki.revoke(str(c.serial))
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.is_signature_valid(_cert(pki.ca_cert_path).public_key())  # type: ignore[arg-type]
    for bundle in (a, b, c):
        assert crl.get_revoked_certificate_by_serial_number(bundle.serial) is not None
    assert x509.load_der_x509_crl(pki.crl_der_path.read_bytes()) == crl
    with pytest.raises(CertsError, match="already revoked"):
        pki.revoke(f"{a.serial:x}")
    with pytest.raises(UnknownIdentityError, match="certs list"):
        pki.revoke("nobody")


def test_verify(pki: Pki, tmp_path: Path) -> None:
    good = pki.issue("dev-1", tenant="acme", role=Role.DEVICE)
    assert pki.verify(good.cert).ok
    assert pki.verify(good.cert_der).ok
    past = datetime.now(UTC) - timedelta(days=10)
    old = pki.issue(
        "dev-old", tenant="acme", role=Role.DEVICE, not_before=past, not_after=past + timedelta(1)
    )
    assert any("expired" in p for p in pki.verify(old.cert).problems)
    pki.revoke("dev-1")
    assert pki.verify(good.cert).problems == ["revoked"]
    other = Pki(tmp_path / "other")
    other.init_ca()
    stranger = other.issue("dev-1", tenant="acme", role=Role.DEVICE)
    assert "not issued by this CA" in pki.verify(stranger.cert).problems
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(CertsError, match="not a PEM or DER certificate"):
        pki.verify(tmp_path / "junk.pem")


def test_no_ca_yet(tmp_path: Path) -> None:
    with pytest.raises(NoCaError, match="fieldline certs init-ca"):
        Pki(tmp_path / "empty").issue("dev-1", tenant="acme", role=Role.DEVICE)


# -- the CLI ---------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from fieldline.settings import get_settings

    monkeypatch.setenv("FIELDLINE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_cli_walkthrough(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CA_PASS", "s3cret")
    result = runner.invoke(app, ["init-ca", "--passphrase-env", "CA_PASS"])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    result = runner.invoke(app, ["issue", "ops-1", "--tenant", "acme", "--role", "operator"])
    assert isinstance(result.exception, PassphraseError)
    result = runner.invoke(
        app,
        [
            "issue",
            "ops-1",
            "--tenant",
            "acme",
            "--role",
            "operator",
            "--ca-passphrase-env",
            "CA_PASS",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "mosquitto_sub" in result.output
    assert "BEGIN" not in result.output  # no key material printed
    result = runner.invoke(app, ["list", "--json"])
    rows = json.loads(result.output)
    assert [(r["id"], r["role"], r["revoked"]) for r in rows] == [("ops-1", "operator", False)]
    result = runner.invoke(app, ["revoke", "ops-1", "--ca-passphrase-env", "CA_PASS"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(home / "pki/issued/ops-1/cert.pem")])
    assert result.exit_code == 1
    assert "revoked" in result.output
    result = runner.invoke(app, ["list"])
    assert "ops-1" in result.output


@pytest.mark.parametrize(
    "command", ["init-ca", "issue", "server", "revoke", "crl", "list", "verify", "show"]
)
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert len(result.output) > 200


def test_issue_many_writes_the_registry_once_and_refuses_duplicates(pki: Pki) -> None:
    bundles = pki.issue_many([f"pump-{i}" for i in range(20)], tenant="acme", role=Role.DEVICE)
    assert [b.identity.id for b in bundles] == [f"pump-{i}" for i in range(20)]
    assert all(pki.verify(b.cert).ok for b in bundles)
    assert len({b.serial for b in bundles}) == 20
    assert stat.S_IMODE(bundles[0].key.stat().st_mode) == 0o600
    with pytest.raises(AlreadyExistsError, match="pump-3"):
        pki.issue_many(["pump-99", "pump-3"], tenant="acme", role=Role.DEVICE)
    assert "pump-99" not in {r.id for r in pki.records()}  # all or nothing
    with pytest.raises(CertsError, match="twice"):
        pki.issue_many(["a", "a"], tenant="acme", role=Role.DEVICE)


def test_bundles_finds_the_current_bundle_of_each_id_in_one_read(pki: Pki) -> None:
    pki.issue_many(["tank-1", "tank-2", "tank-3"], tenant="acme", role=Role.DEVICE)
    pki.revoke("tank-2")
    reissued = pki.issue("tank-3", tenant="acme", role=Role.DEVICE, force=True)
    found = pki.bundles(["tank-1", "tank-2", "tank-3", "nobody"])
    assert sorted(found) == ["tank-1", "tank-3"]  # revoked and unknown ids have none
    assert found["tank-3"].serial == reissued.serial == pki.bundle("tank-3").serial
    assert found["tank-1"].identity.tenant == "acme"


def test_client_context_loads_a_bundle_or_names_what_is_missing(pki: Pki) -> None:
    from certs import client_context
    from certs.errors import BundleError

    bundle = pki.issue("gauge-1", tenant="acme", role=Role.DEVICE)
    context = client_context(bundle.directory)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    bundle.key.unlink()
    with pytest.raises(BundleError, match=r"missing .*key\.pem"):
        client_context(bundle.directory)
    bundle.key.write_text("not a key")
    with pytest.raises(BundleError, match="cannot load"):
        client_context(bundle.directory)
