"""The PKI: CA, device/operator/service/admin and broker certificates, CRL, identity registry."""

from certs.authority import Pki, load_certificate
from certs.context import client_context
from certs.errors import CertsError
from certs.model import Bundle, CertRecord, Identity, KeyType, Role, Verification

__all__ = [
    "Bundle",
    "CertRecord",
    "CertsError",
    "Identity",
    "KeyType",
    "Pki",
    "Role",
    "Verification",
    "client_context",
    "load_certificate",
]
