"""Who a connection is: the principal its verified client certificate names, kept on the session."""

from __future__ import annotations

from typing import Any

from cryptography import x509

from broker.policy import Decision, Principal
from certs import Identity

# Keys in amqtt's `Session.attributes`, namespaced as amqtt asks of extensions.
PRINCIPAL = "fieldline.principal"
SERIAL = "fieldline.serial"
AUTH_REFUSAL = "fieldline.auth_refusal"
DENIAL = "fieldline.denial"


def principal_from_certificate(cert: x509.Certificate) -> Principal:
    """CN = id, O = tenant, OU = role; raises certs' InvalidIdentityError when one is missing."""
    identity = Identity.from_certificate(cert)
    return Principal(identity.id, identity.tenant, identity.role)


def principal_of(session: Any) -> Principal | None:
    """The principal the auth plugin recorded for this session's current connection."""
    attributes = getattr(session, "attributes", None)
    if not attributes:
        return None
    principal = attributes.get(PRINCIPAL)
    return principal if isinstance(principal, Principal) else None


def last_denial(session: Any) -> Decision | None:
    """The most recent denied decision the topic plugin recorded (for metrics and logs)."""
    attributes = getattr(session, "attributes", None) or {}
    decision = attributes.get(DENIAL)
    return decision if isinstance(decision, Decision) else None
