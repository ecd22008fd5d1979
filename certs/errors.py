"""Errors of the PKI."""


class CertsError(Exception):
    """Base: a PKI operation failed; the message says what was wrong and what to do."""
