"""Errors of the wire contract."""


class SchemaError(ValueError):
    """Base: a topic or a payload does not follow the wire contract."""
