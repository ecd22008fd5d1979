"""Errors of the wire contract: every one is a `SchemaError`, itself a `ValueError`."""

from __future__ import annotations


class SchemaError(ValueError):
    """Base: a topic or a payload does not follow the wire contract."""


class InvalidIdError(SchemaError):
    """A tenant, device, command or group id does not match the id grammar."""

    def __init__(self, value: object, what: str, problem: str) -> None:
        self.value = value
        self.what = what
        self.problem = problem
        super().__init__(
            f"{what} {value!r} is invalid: {problem}; "
            "use 1-64 of a-z 0-9 _ - starting with a letter or digit"
        )


class InvalidTopicError(SchemaError):
    """A topic name is not one of the fieldline topics."""

    def __init__(self, topic: object, problem: str) -> None:
        self.topic = topic
        self.problem = problem
        super().__init__(f"topic {topic!r} is invalid: {problem}")


class InvalidFilterError(SchemaError):
    """An MQTT topic filter is malformed (MQTT 3.1.1 section 4.7)."""

    def __init__(self, topic_filter: object, problem: str) -> None:
        self.filter = topic_filter
        self.problem = problem
        super().__init__(f"topic filter {topic_filter!r} is invalid: {problem}")


class PayloadError(SchemaError):
    """A payload was refused; `reason` is a short code for the dead-letter table."""

    def __init__(self, reason: str, message: str, *, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        self.message = message
        super().__init__(message)

    def __repr__(self) -> str:
        return f"PayloadError(reason={self.reason!r}, message={self.message!r})"
