"""fieldline's wire contract: topic grammar, message models, JSON Schema export.

`schemas.topics` builds and parses every topic; `schemas.messages` validates payloads.
"""

from schemas.errors import (
    InvalidFilterError,
    InvalidIdError,
    InvalidTopicError,
    PayloadError,
    SchemaError,
)
from schemas.limits import DEFAULT_LIMITS, Limits
from schemas.messages import (
    Command,
    CommandResult,
    CommandStatus,
    Event,
    Message,
    MetricKind,
    Quantity,
    Reading,
    Reason,
    Sample,
    Severity,
    State,
    Status,
    Telemetry,
    decode,
    decode_command,
    decode_command_result,
    decode_event,
    decode_status,
    decode_telemetry,
    encode,
)
from schemas.topics import Kind, Topic, parse, validate_id

__all__ = [
    "DEFAULT_LIMITS",
    "Command",
    "CommandResult",
    "CommandStatus",
    "Event",
    "InvalidFilterError",
    "InvalidIdError",
    "InvalidTopicError",
    "Kind",
    "Limits",
    "Message",
    "MetricKind",
    "PayloadError",
    "Quantity",
    "Reading",
    "Reason",
    "Sample",
    "SchemaError",
    "Severity",
    "State",
    "Status",
    "Telemetry",
    "Topic",
    "decode",
    "decode_command",
    "decode_command_result",
    "decode_event",
    "decode_status",
    "decode_telemetry",
    "encode",
    "parse",
    "validate_id",
]
