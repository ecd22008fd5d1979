"""The fieldline certificate authority: a CA, issued bundles, a registry and a CRL on disk."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.crl import CrlStatus, read_crl
from certs.errors import (
    AlreadyExistsError,
    CertsError,
    InvalidIdentityError,
    NoCaError,
    PassphraseError,
    UnknownIdentityError,
)
from certs.model import (
    CLIENT_ROLES,
    Bundle,
    CertRecord,
    Identity,
    KeyType,
    Role,
    Verification,
    check_id,
)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
SERVER_TENANT = "fieldline"
DEFAULT_CRL_DAYS = 30.0
# certificates are backdated a little so a device whose clock lags still accepts them
_BACKDATE = timedelta(minutes=5)


SERIAL_URI_PREFIX = "urn:fieldline:serial:"


def serial_uri(serial: int) -> str:
    """The URI a client certificate carries for its own serial (lower-case hex)."""
    return f"{SERIAL_URI_PREFIX}{serial:x}"


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    bits = 2048 if key_type is KeyType.RSA_2048 else 3072
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _write_private(path: Path, data: bytes) -> None:
    # created 0600 from the first byte: never a moment where the key is world-readable
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_certificate(path: Path) -> x509.Certificate:
    """A certificate from a PEM or DER file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertsError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CertsError(f"{path} is not a PEM or DER certificate: {exc}") from exc


@dataclass(frozen=True)
class _Request:
    """One certificate to issue."""

    identity: Identity
    directory: Path
    san: list[x509.GeneralName]
    usage: x509.ObjectIdentifier
    start: datetime
    end: datetime
    key_type: KeyType


class Pki:
    """A PKI rooted at one directory (FIELDLINE_HOME/pki): 0700, keys 0600.

    Every CRL it writes (init, revoke, re-issue, renew) is current for `crl_validity_days`.
    """

    def __init__(self, root: Path, crl_validity_days: float = DEFAULT_CRL_DAYS) -> None:
        if crl_validity_days <= 0:
            raise CertsError(f"the CRL validity must be positive, got {crl_validity_days} days")
        self.root = root
        self.crl_validity_days = crl_validity_days

    # -- layout --------------------------------------------------------------------------
    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def ca_der_path(self) -> Path:
        return self.root / "ca" / "ca.der"

    @property
    def crl_path(self) -> Path:
        return self.root / "crl.pem"

    @property
    def crl_der_path(self) -> Path:
        return self.root / "crl.der"

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.json"

    def exists(self) -> bool:
        """True when a CA has been created here."""
        return self.ca_cert_path.is_file() and self.ca_key_path.is_file()

    # -- the CA --------------------------------------------------------------------------
    def init_ca(
        self,
        *,
        name: str = "fieldline CA",
        key_type: KeyType = KeyType.EC_P256,
        passphrase: str | None = None,
        days: int = 3650,
        force: bool = False,
    ) -> Path:
        """Create the CA (and an empty CRL). With force, the old CA and everything it issued go."""
        if days <= 0:
            raise CertsError(f"--days must be positive, got {days}")
        self._make_root()
        with self._locked():
            if self.exists() and not force:
                raise AlreadyExistsError(
                    f"a CA already exists in {self.root}; pass --force to replace it "
                    "(every certificate it issued stops working)"
                )
            if force:
                for sub in ("issued", "server", "ca"):
                    shutil.rmtree(self.root / sub, ignore_errors=True)
                for path in (self.registry_path, self.crl_path, self.crl_der_path):
                    path.unlink(missing_ok=True)
            key = _new_key(key_type)
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fieldline"),
                ]
            )
            now = _now()
            cert = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE)
                .not_valid_after(now + timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
                .sign(key, hashes.SHA256())
            )
            (self.root / "ca").mkdir(mode=0o700, exist_ok=True)
            encryption: serialization.KeySerializationEncryption = (
                serialization.BestAvailableEncryption(passphrase.encode())
                if passphrase
                else serialization.NoEncryption()
            )
            _write_private(
                self.ca_key_path,
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
                ),
            )
            _write_public(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
            _write_public(self.ca_der_path, cert.public_bytes(serialization.Encoding.DER))
            self._save([])
            self._write_crl_locked(cert, key, [])
        return self.ca_cert_path

    def ca_certificate(self) -> x509.Certificate:
        if not self.exists():
            raise NoCaError(f"no CA in {self.root}: run `fieldline certs init-ca` first")
        return load_certificate(self.ca_cert_path)

    def _ca(self, passphrase: str | None) -> tuple[x509.Certificate, PrivateKey]:
        cert = self.ca_certificate()
        data = self.ca_key_path.read_bytes()
        try:
            key = serialization.load_pem_private_key(
                data, passphrase.encode() if passphrase else None
            )
        except TypeError as exc:
            if passphrase:
                raise PassphraseError("the CA key is not encrypted; omit the passphrase") from exc
            raise PassphraseError(
                "the CA key is encrypted: give its passphrase with --ca-passphrase-env VAR"
            ) from exc
        except ValueError as exc:
            raise PassphraseError("wrong passphrase for the CA key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CertsError(f"unsupported CA key type {type(key).__name__}")
        return cert, key

    # -- issuing -------------------------------------------------------------------------
    def issue(
        self,
        identity_id: str,
        *,
        tenant: str,
        role: Role,
        days: int = 365,
        force: bool = False,
        ca_passphrase: str | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        key_type: KeyType = KeyType.EC_P256,
    ) -> Bundle:
        """Issue a client certificate (device, operator, service or admin) and write its bundle."""
        role = Role(role)
        if role not in CLIENT_ROLES:
            raise InvalidIdentityError(
                f"role {role.value!r} is not a client role; use one of "
                f"{', '.join(r.value for r in CLIENT_ROLES)} (broker certificates: `certs server`)"
            )
        identity = Identity(check_id(identity_id, "id"), check_id(tenant, "tenant id"), role)
        san: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(f"urn:fieldline:{tenant}:{role.value}:{identity_id}")
        ]
        return self._issue(
            identity,
            self.root / "issued" / identity.id,
            san,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            days=days,
            force=force,
            ca_passphrase=ca_passphrase,
            not_before=not_before,
            not_after=not_after,
            key_type=key_type,
        )

    def issue_server(
        self,
        name: str = "broker",
        *,
        hosts: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
        days: int = 825,
        force: bool = False,
        ca_passphrase: str | None = None,
    ) -> Bundle:
        """Issue a broker (server) certificate with DNS and IP subject alternative names."""
        identity = Identity(check_id(name, "server name"), SERVER_TENANT, Role.SERVER)
        san: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
        for ip in ips:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError as exc:
                raise CertsError(f"--ip {ip!r} is not an IP address") from exc
        if not san:
            raise CertsError("a server certificate needs at least one --host or --ip")
        return self._issue(
            identity,
            self.root / "server" / identity.id,
            san,
            ExtendedKeyUsageOID.SERVER_AUTH,
            days=days,
            force=force,
            ca_passphrase=ca_passphrase,
        )

    def _issue(
        self,
        identity: Identity,
        directory: Path,
        san: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        *,
        days: int,
        force: bool,
        ca_passphrase: str | None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        key_type: KeyType = KeyType.EC_P256,
    ) -> Bundle:
        now = _now()
        start = not_before or now - _BACKDATE
        end = not_after or now + timedelta(days=days)
        request = _Request(identity, directory, san, usage, start, end, key_type)
        return self._issue_all([request], force=force, ca_passphrase=ca_passphrase)[0]

    def issue_many(
        self,
        ids: Sequence[str],
        *,
        tenant: str,
        role: Role,
        days: int = 365,
        force: bool = False,
        ca_passphrase: str | None = None,
        key_type: KeyType = KeyType.EC_P256,
    ) -> list[Bundle]:
        """Issue client certificates for many ids at once (a fleet): one registry write."""
        role = Role(role)
        if role not in CLIENT_ROLES:
            raise InvalidIdentityError(f"role {role.value!r} is not a client role")
        tenant = check_id(tenant, "tenant id")
        if len(set(ids)) != len(ids):
            raise CertsError("the same id appears twice in one batch")
        now = _now()
        requests = []
        for identity_id in ids:
            identity = Identity(check_id(identity_id, "id"), tenant, role)
            san: list[x509.GeneralName] = [
                x509.UniformResourceIdentifier(f"urn:fieldline:{tenant}:{role.value}:{identity_id}")
            ]
            requests.append(
                _Request(
                    identity,
                    self.root / "issued" / identity.id,
                    san,
                    ExtendedKeyUsageOID.CLIENT_AUTH,
                    now - _BACKDATE,
                    now + timedelta(days=days),
                    key_type,
                )
            )
        return self._issue_all(requests, force=force, ca_passphrase=ca_passphrase)

    def _issue_all(
        self, requests: Sequence[_Request], *, force: bool, ca_passphrase: str | None
    ) -> list[Bundle]:
        for request in requests:
            if request.end <= request.start:
                raise CertsError(
                    f"the certificate would expire ({request.end}) before it starts "
                    f"({request.start})"
                )
        now = _now()
        with self._locked():
            ca_cert, ca_key = self._ca(ca_passphrase)
            records = self._load()
            wanted = {r.identity.id for r in requests}
            active = [r for r in records if r.id in wanted and r.revoked_at is None]
            if active and not force:
                other = active[0]
                raise AlreadyExistsError(
                    f"id {other.id!r} is already issued ({other.role.value} of tenant "
                    f"{other.tenant}, serial {other.serial_hex}); ids are unique across tenants "
                    "because the MQTT client id is the CN. Pass --force to re-issue (the old "
                    "certificate is revoked)"
                )
            for old in active:
                old.revoked_at = now
                old.reason = "superseded"
            bundles = []
            for request in requests:
                serial = self._write_bundle(request, ca_cert, ca_key)
                records.append(
                    CertRecord(
                        id=request.identity.id,
                        tenant=request.identity.tenant,
                        role=request.identity.role,
                        serial=serial,
                        not_before=request.start,
                        not_after=request.end,
                        directory=str(request.directory.relative_to(self.root)),
                    )
                )
                bundles.append(Bundle(request.identity, request.directory, serial, request.end))
            self._save(records)
            if active:
                self._write_crl_locked(ca_cert, ca_key, records)
        return bundles

    @staticmethod
    def _write_bundle(request: _Request, ca_cert: x509.Certificate, ca_key: PrivateKey) -> int:
        """Make the key and certificate and write the bundle's six files; the serial."""
        identity, directory = request.identity, request.directory
        key = _new_key(request.key_type)
        public = key.public_key()
        key_usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=isinstance(key, rsa.RSAPrivateKey),
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        serial = x509.random_serial_number()
        san = list(request.san)
        if request.usage == ExtendedKeyUsageOID.CLIENT_AUTH:
            # one name per certificate, not per id: a broker that maps certificates to users
            # by name (NATS verify_and_map) then tells a re-issued id's old certificate apart
            san.append(x509.UniformResourceIdentifier(serial_uri(serial)))
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, identity.id),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.tenant),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role.value),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(request.start)
            .not_valid_after(request.end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([request.usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700, parents=True)
        pem, der = serialization.Encoding.PEM, serialization.Encoding.DER
        pkcs8, plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        _write_private(directory / "key.pem", key.private_bytes(pem, pkcs8, plain))
        _write_private(directory / "key.der", key.private_bytes(der, pkcs8, plain))
        _write_public(directory / "cert.pem", cert.public_bytes(pem))
        _write_public(directory / "cert.der", cert.public_bytes(der))
        _write_public(directory / "ca.pem", ca_cert.public_bytes(pem))
        _write_public(directory / "ca.der", ca_cert.public_bytes(der))
        return int(cert.serial_number)

    # -- revocation ----------------------------------------------------------------------
    def revoke(
        self, id_or_serial: str, *, ca_passphrase: str | None = None, reason: str = "unspecified"
    ) -> CertRecord:
        """Revoke by id (its current certificate) or by serial (hex or decimal); rewrite the CRL."""
        with self._locked():
            ca_cert, ca_key = self._ca(ca_passphrase)
            records = self._load()
            record = self._find(records, id_or_serial)
            if record.revoked_at is not None:
                raise CertsError(f"serial {record.serial_hex} ({record.id}) is already revoked")
            record.revoked_at = _now()
            record.reason = reason
            self._save(records)
            self._write_crl_locked(ca_cert, ca_key, records)
        return record

    def write_crl(self, *, ca_passphrase: str | None = None, days: float | None = None) -> Path:
        """Regenerate the CRL (PEM and DER); brokers re-read it (Mosquitto on SIGHUP)."""
        self.renew_crl(ca_passphrase=ca_passphrase, days=days)
        return self.crl_path

    def renew_crl(
        self, *, ca_passphrase: str | None = None, days: float | None = None
    ) -> CrlStatus:
        """Sign a new CRL from the registry, current for `days` (default crl_validity_days)."""
        if days is not None and days <= 0:
            raise CertsError(f"--days must be positive, got {days}")
        with self._locked():
            ca_cert, ca_key = self._ca(ca_passphrase)
            self._write_crl_locked(ca_cert, ca_key, self._load(), days=days)
            return read_crl(self.crl_path, ca_cert)

    def crl_status(self, path: Path | None = None) -> CrlStatus:
        """The CRL on disk (or a copy of it at `path`), checked against the CA certificate; the
        CA key need not be here (a broker host has only the certificate)."""
        if not self.ca_cert_path.is_file():
            raise NoCaError(
                f"no CA certificate in {self.root}: run `fieldline certs init-ca` first"
            )
        return read_crl(path or self.crl_path, load_certificate(self.ca_cert_path))

    def ca_key_problem(self) -> str | None:
        """Why this process cannot sign without a passphrase, or None when it can."""
        try:
            data = self.ca_key_path.read_bytes()
        except OSError as exc:
            return f"cannot read the CA key {self.ca_key_path}: {exc.strerror}"
        if b"ENCRYPTED" in data.split(b"\n", 1)[0]:
            return "the CA key is encrypted (renew with --ca-passphrase-env)"
        return None

    def _write_crl_locked(
        self,
        ca_cert: x509.Certificate,
        ca_key: PrivateKey,
        records: list[CertRecord],
        days: float | None = None,
    ) -> None:
        now = _now()
        validity = timedelta(days=self.crl_validity_days if days is None else days)
        # thisUpdate a little in the past: a broker whose clock is behind must not find the CRL
        # "not yet valid" (that refuses everyone too); a short test CRL is backdated less
        backdate = min(_BACKDATE, validity / 10)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - backdate)
            .next_update(now + validity)
        )
        for record in records:
            if record.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(record.serial)
                    .revocation_date(record.revoked_at)
                    .build()
                )
        crl = builder.sign(ca_key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        _write_public(self.crl_der_path, crl.public_bytes(serialization.Encoding.DER))

    # -- the registry --------------------------------------------------------------------
    def records(self) -> list[CertRecord]:
        """Every certificate issued here, revoked ones included, oldest first."""
        self.ca_certificate()
        return self._load()

    def bundle(self, identity_id: str) -> Bundle:
        """The current (unrevoked) bundle of an id."""
        for record in reversed(self.records()):
            if record.id == identity_id and record.revoked_at is None:
                ident = Identity(record.id, record.tenant, record.role)
                return Bundle(ident, self.root / record.directory, record.serial, record.not_after)
        raise UnknownIdentityError(
            f"no valid certificate for {identity_id!r} in {self.root}; "
            "`fieldline certs list` shows what was issued"
        )

    def server_bundle(self, name: str) -> Bundle:
        """The current bundle of a `fieldline certs server` certificate: a client certificate
        of that name is refused, so a broker or web server never serves a client's key."""
        bundle = self.bundle(name)
        if bundle.identity.role is not Role.SERVER:
            raise UnknownIdentityError(
                f"{name!r} is a {bundle.identity.role.value} certificate, not a server one: "
                f"issue one with `fieldline certs server {name} --host ...`"
            )
        return bundle

    def bundles(self, identity_ids: Sequence[str]) -> dict[str, Bundle]:
        """The current bundles of the ids that have one (a fleet: one registry read)."""
        wanted = set(identity_ids)
        found: dict[str, Bundle] = {}
        for record in self.records():
            if record.id in wanted and record.revoked_at is None:
                ident = Identity(record.id, record.tenant, record.role)
                found[record.id] = Bundle(
                    ident, self.root / record.directory, record.serial, record.not_after
                )
        return found

    def is_revoked(self, serial: int) -> bool:
        return any(r.serial == serial and r.revoked_at is not None for r in self._load())

    def verify(self, path: Path) -> Verification:
        """Check a certificate: issued by this CA, in its validity window, not revoked."""
        cert = load_certificate(path)
        ca_cert = self.ca_certificate()
        problems: list[str] = []
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            problems.append("not issued by this CA")
        now = datetime.now(UTC)
        if cert.not_valid_after_utc < now:
            problems.append(f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        if cert.not_valid_before_utc > now:
            problems.append(f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if not problems and self.is_revoked(cert.serial_number):
            problems.append("revoked")
        identity: Identity | None = None
        try:
            identity = Identity.from_certificate(cert)
        except InvalidIdentityError as exc:
            problems.append(str(exc))
        return Verification(not problems, identity, cert.serial_number, problems)

    def _find(self, records: list[CertRecord], key: str) -> CertRecord:
        for record in reversed(records):
            if record.id == key and record.revoked_at is None:
                return record
        text = key.lower().removeprefix("0x").replace(":", "")
        candidates: set[int] = set()
        with contextlib.suppress(ValueError):
            candidates.add(int(text, 16))
        if text.isdigit():
            candidates.add(int(text))
        for record in records:
            if record.serial in candidates:
                return record
        raise UnknownIdentityError(
            f"no certificate with id or serial {key!r}; `fieldline certs list` shows them"
        )

    def _load(self) -> list[CertRecord]:
        if not self.registry_path.is_file():
            return []
        try:
            raw = json.loads(self.registry_path.read_text())
            return [_record_from_json(item) for item in raw["certificates"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CertsError(f"the registry {self.registry_path} is unreadable: {exc}") from exc

    def _save(self, records: list[CertRecord]) -> None:
        payload = {"version": 1, "certificates": [_record_to_json(r) for r in records]}
        _write_public(self.registry_path, (json.dumps(payload, indent=2) + "\n").encode())

    def _make_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # two CLI calls at once must not lose each other's registry entries
        self._make_root()
        with (self.root / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _record_to_json(record: CertRecord) -> dict[str, Any]:
    data = asdict(record)
    data["role"] = record.role.value
    data["serial"] = str(record.serial)
    data["serial_hex"] = record.serial_hex
    for key in ("not_before", "not_after", "revoked_at"):
        value = getattr(record, key)
        data[key] = value.isoformat() if value else None
    return data


def _record_from_json(data: dict[str, Any]) -> CertRecord:
    revoked = data.get("revoked_at")
    return CertRecord(
        id=data["id"],
        tenant=data["tenant"],
        role=Role(data["role"]),
        serial=int(data["serial"]),
        not_before=datetime.fromisoformat(data["not_before"]),
        not_after=datetime.fromisoformat(data["not_after"]),
        directory=data["directory"],
        revoked_at=datetime.fromisoformat(revoked) if revoked else None,
        reason=data.get("reason"),
    )
