"""What the PKI hands out: roles, identities, bundles and registry records."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from certs.errors import InvalidIdentityError
from schemas.errors import SchemaError
from schemas.topics import validate_id


class Role(StrEnum):
    """The certificate's OU: what the principal may do (docs/design.md, Identity and ACLs)."""

    DEVICE = "device"
    OPERATOR = "operator"
    SERVICE = "service"
    ADMIN = "admin"
    SERVER = "server"


CLIENT_ROLES = (Role.DEVICE, Role.OPERATOR, Role.SERVICE, Role.ADMIN)


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"


def check_id(value: str, what: str) -> str:
    """An id or tenant per the topic grammar, as a CertsError."""
    try:
        return validate_id(value, what)
    except SchemaError as exc:
        raise InvalidIdentityError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class Identity:
    """CN = id, O = tenant, OU = role."""

    id: str
    tenant: str
    role: Role

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> Identity:
        """The identity a certificate carries; InvalidIdentityError when it has none."""

        def one(oid: x509.ObjectIdentifier, what: str) -> str:
            values = cert.subject.get_attributes_for_oid(oid)
            if len(values) != 1:
                raise InvalidIdentityError(f"certificate has {len(values)} {what} fields, need 1")
            return str(values[0].value)

        ident = check_id(one(NameOID.COMMON_NAME, "CN"), "certificate CN")
        tenant = check_id(one(NameOID.ORGANIZATION_NAME, "O"), "certificate O (tenant)")
        role_text = one(NameOID.ORGANIZATIONAL_UNIT_NAME, "OU")
        try:
            role = Role(role_text)
        except ValueError as exc:
            raise InvalidIdentityError(f"certificate OU {role_text!r} is not a role") from exc
        return cls(ident, tenant, role)


@dataclass(frozen=True)
class Bundle:
    """The files of one issued certificate: PEM for brokers and tools, DER for MicroPython."""

    identity: Identity
    directory: Path
    serial: int
    not_after: datetime

    @property
    def cert(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert_der(self) -> Path:
        return self.directory / "cert.der"

    @property
    def key_der(self) -> Path:
        return self.directory / "key.der"

    @property
    def ca_der(self) -> Path:
        return self.directory / "ca.der"


@dataclass
class CertRecord:
    """One line of the registry: every certificate ever issued, revoked ones included."""

    id: str
    tenant: str
    role: Role
    serial: int
    not_before: datetime
    not_after: datetime
    directory: str
    revoked_at: datetime | None = None
    reason: str | None = None

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


@dataclass
class Verification:
    """The result of checking a certificate against this PKI."""

    ok: bool
    identity: Identity | None
    serial: int | None
    problems: list[str] = field(default_factory=list)
