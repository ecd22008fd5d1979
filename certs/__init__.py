"""The PKI: CA, device/operator/service/admin and broker certificates, CRL, identity registry."""

from certs.authority import Pki, load_certificate, serial_uri
from certs.context import client_context
from certs.crl import CrlStatus, Renewer, expired_line, read_crl
from certs.errors import CertsError
from certs.model import Bundle, CertRecord, Identity, KeyType, Role, Verification

__all__ = [
    "Bundle",
    "CertRecord",
    "CertsError",
    "CrlStatus",
    "Identity",
    "KeyType",
    "Pki",
    "Renewer",
    "Role",
    "Verification",
    "client_context",
    "expired_line",
    "load_certificate",
    "read_crl",
    "serial_uri",
]
