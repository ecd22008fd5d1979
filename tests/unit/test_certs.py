"""The PKI with real cryptography: identities, extensions, file modes, revocation, verification."""

from __future__ import annotations

import json
import os
import ssl
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from broker.errors import BrokerError
from broker.mosquitto import write_mosquitto_files
from broker.nats import write_nats_files
from broker.service import options_from_settings
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
from core.settings import load_settings


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
    # the identity, and this certificate's own serial (what NATS maps users by)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:fieldline:acme:device:dev-1",
        f"urn:fieldline:serial:{cert.serial_number:x}",
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


def test_a_client_certificate_named_like_the_server_is_never_served(
    pki: Pki, tmp_path: Path
) -> None:
    # a device called `broker` has a key the brokers must not serve as theirs
    pki.issue("broker", tenant="acme", role=Role.DEVICE)
    with pytest.raises(CertsError, match="device certificate, not a server one"):
        pki.server_bundle("broker")
    with pytest.raises(BrokerError, match="not a server one"):
        options_from_settings(load_settings(home=tmp_path))
    with pytest.raises(BrokerError, match="not a server one"):
        write_mosquitto_files(pki, tmp_path / "mosquitto")
    with pytest.raises(BrokerError, match="not a server one"):
        write_nats_files(pki, tmp_path / "nats")
    server = pki.issue_server("mqtt-1", hosts=["localhost"])
    assert pki.server_bundle("mqtt-1") == server


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
    from core.settings import get_settings

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
    "command",
    ["init-ca", "issue", "server", "revoke", "crl", "crl show", "crl renew", "list", "verify",
     "show"],
)  # fmt: skip
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [*command.split(), "--help"])
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


# -- the CRL's life cycle ----------------------------------------------------------------------


def test_crl_status_says_what_the_crl_holds_and_when_it_is_due(pki: Pki) -> None:
    from certs import read_crl

    pki.issue("dev-a", tenant="acme", role=Role.DEVICE)
    revoked = pki.revoke("dev-a")
    status = pki.crl_status()
    assert status.issuer == "O=fieldline,CN=fieldline CA"
    assert status.serials == {revoked.serial}
    assert status.revoked == 1
    assert status.next_update is not None
    # 30 days (the default), thisUpdate backdated 5 minutes against clock skew
    assert status.next_update - status.this_update == timedelta(days=30, minutes=5)
    now = datetime.now(UTC)
    assert not status.expired(now)
    assert not status.renewal_due(now)
    # due once a third remains (10 days of 30), expired at nextUpdate
    assert not status.renewal_due(status.next_update - timedelta(days=10, minutes=3))
    assert status.renewal_due(status.next_update - timedelta(days=10))
    assert status.expired(status.next_update)
    assert read_crl(pki.crl_der_path, _cert(pki.ca_cert_path)).serials == status.serials


def test_renewal_keeps_every_revoked_serial_and_uses_the_configured_validity(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki", crl_validity_days=0.5)
    pki.init_ca()
    assert pki.crl_status().validity == timedelta(hours=12, minutes=5)
    serials = {pki.issue(f"dev-{i}", tenant="acme", role=Role.DEVICE).serial for i in range(3)}
    for i in range(3):
        pki.revoke(f"dev-{i}")
    # a revocation rewrites the CRL with the PKI's validity too
    assert pki.crl_status().validity == timedelta(hours=12, minutes=5)
    before = pki.crl_status()
    renewed = pki.renew_crl(days=2)
    assert renewed.serials == serials == before.serials
    assert renewed.next_update is not None
    assert before.next_update is not None
    assert renewed.next_update > before.next_update
    assert renewed.validity == timedelta(days=2, minutes=5)
    # a very short CRL (tests) is backdated by a tenth of its validity, not 5 minutes
    short = pki.renew_crl(days=10 / 86400)
    assert short.validity == timedelta(seconds=11)
    with pytest.raises(CertsError, match="positive"):
        pki.renew_crl(days=0)
    with pytest.raises(CertsError, match="positive"):
        Pki(tmp_path / "x", crl_validity_days=0)


def test_a_crl_from_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    other.init_ca(name="not ours")
    with pytest.raises(CertsError, match="not signed by the CA"):
        pki.crl_status(other.crl_path)
    (tmp_path / "junk.pem").write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(CertsError, match="is not a CRL"):
        pki.crl_status(tmp_path / "junk.pem")


def test_the_renewer_renews_only_when_due_and_only_with_a_usable_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from certs import Renewer

    pki = Pki(tmp_path / "pki")
    pki.init_ca()
    pki.issue("dev-r", tenant="acme", role=Role.DEVICE)
    pki.revoke("dev-r")
    renewer = Renewer(pki, check_s=1)
    first, first_bytes = pki.crl_status(), pki.crl_path.read_bytes()
    assert first.next_update is not None
    assert renewer.check() is None  # 30 days left: nothing to do
    assert pki.crl_path.read_bytes() == first_bytes
    later = first.next_update - timedelta(days=9)  # less than a third left
    renewed = renewer.check(now=later)
    assert renewed is not None
    assert pki.crl_path.read_bytes() != first_bytes  # signed again (ECDSA: never the same)
    assert renewed.serials == first.serials

    locked = Pki(tmp_path / "locked")
    locked.init_ca(passphrase="pw")
    assert locked.ca_key_problem() is not None
    assert Pki(tmp_path / "pki").ca_key_problem() is None
    status, status_bytes = locked.crl_status(), locked.crl_path.read_bytes()
    assert status.next_update is not None
    caplog.set_level("INFO", logger="certs.crl")
    stuck = Renewer(locked, check_s=1)
    for _ in range(3):
        assert stuck.check(now=status.next_update) is None
    assert locked.crl_path.read_bytes() == status_bytes
    skipped = [r for r in caplog.records if "crl_renewal_skipped" in r.getMessage()]
    assert len(skipped) == 1, "logged once, not on every check"
    assert "encrypted" in skipped[0].getMessage()


def test_cli_crl_shows_renews_and_exits_by_state(home: Path) -> None:
    assert runner.invoke(app, ["init-ca"]).exit_code == 0
    assert (
        runner.invoke(app, ["issue", "dev-c", "--tenant", "acme", "--role", "device"]).exit_code
        == 0
    )
    assert runner.invoke(app, ["revoke", "dev-c"]).exit_code == 0

    result = runner.invoke(app, ["crl"])
    assert result.exit_code == 0, result.output
    for words in ("issuer", "O=fieldline,CN=fieldline CA", "next update", "1 certificate",
                  "time left", "29d 23h", "status       current"):  # fmt: skip
        assert words in result.output, words
    # within the threshold: exit 1 (a check), same output from `crl show`
    result = runner.invoke(app, ["crl", "show", "--within", "31"])
    assert result.exit_code == 1, result.output
    assert "expires within 31 days" in result.output

    result = runner.invoke(app, ["crl", "renew", "--if-due"])
    assert result.exit_code == 0, result.output
    assert "renewal due" in result.output
    before = Pki(home / "pki").crl_status()
    result = runner.invoke(app, ["crl", "renew", "--days", str(1 / 86400)])
    assert result.exit_code == 0, result.output
    assert "CRL renewed" in result.output
    assert "1 revoked" in result.output
    after = Pki(home / "pki").crl_status()
    assert after.serials == before.serials
    deadline = after.next_update
    assert deadline is not None
    while datetime.now(UTC) < deadline:
        time.sleep(0.05)
    result = runner.invoke(app, ["crl"])
    assert result.exit_code == 2, result.output
    assert "EXPIRED" in result.output
    assert "event=crl_expired next_update=" in result.stderr
    assert "run: fieldline certs crl renew" in result.stderr
    data = json.loads(runner.invoke(app, ["crl", "show", "--json"]).stdout)
    assert data["revoked"] == 1
    assert data["seconds_left"] <= 0
    # --if-due renews an expired CRL with the configured validity (30 days)
    result = runner.invoke(app, ["crl", "renew", "--if-due"])
    assert result.exit_code == 0, result.output
    assert "CRL renewed" in result.output
    assert runner.invoke(app, ["crl"]).exit_code == 0
    assert Pki(home / "pki").crl_status().serials == before.serials


def test_cli_crl_validity_comes_from_settings(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    monkeypatch.setenv("FIELDLINE_CERTS__CRL_VALIDITY_DAYS", "2")
    get_settings.cache_clear()
    assert runner.invoke(app, ["init-ca"]).exit_code == 0
    assert Pki(home / "pki").crl_status().validity == timedelta(days=2, minutes=5)
    result = runner.invoke(app, ["crl", "show", "--within", "1"])
    assert result.exit_code == 0, result.output
    assert "current, renewal due" not in result.output
    result = runner.invoke(app, ["crl", "--file", str(home / "nope.pem")])
    assert isinstance(result.exception, CertsError)
    assert "cannot read the CRL" in str(result.exception)
