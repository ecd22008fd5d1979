"""Errors of the PKI: each message says what was wrong and what to do."""


class CertsError(Exception):
    """Base: a PKI operation failed."""


class NoCaError(CertsError):
    """There is no CA yet."""


class AlreadyExistsError(CertsError):
    """A CA or identity exists and --force was not given."""


class UnknownIdentityError(CertsError):
    """No certificate with that id or serial in the registry."""


class PassphraseError(CertsError):
    """The CA key's passphrase is missing or wrong."""


class InvalidIdentityError(CertsError):
    """An id, tenant or role is not acceptable, or a certificate carries no valid identity."""


class BundleError(CertsError):
    """An issued bundle's files are missing or unreadable."""
