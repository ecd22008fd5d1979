"""The error base every package's errors may build on, and the bottom layer's own."""


class FieldlineError(Exception):
    """Base of fieldline's errors; the message says what was wrong and what to do."""


class SettingsError(FieldlineError):
    """The configuration (environment or fieldline.toml) is invalid."""


class ClusterError(FieldlineError):
    """The embedded PostgreSQL cluster could not be created, started or stopped."""
