"""Errors of the umbrella package: settings and the local stack."""


class FieldlineError(Exception):
    """Base of the umbrella's errors; the message says what was wrong and what to do."""


class SettingsError(FieldlineError):
    """The configuration (environment or fieldline.toml) is invalid."""


class ClusterError(FieldlineError):
    """The embedded PostgreSQL cluster could not be created, started or stopped."""
