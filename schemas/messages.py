"""The message models of the wire contract (pydantic v2) and their fast decoding.

Every payload is one UTF-8 JSON object. `decode_*` take the raw MQTT payload, refuse
oversize ones before parsing, validate in a single `model_validate_json` pass and raise
only `PayloadError`, whose `reason` is a short code for the dead-letter table.
The hot path (telemetry) keeps per-value work in one Python loop over the metrics.
"""

from __future__ import annotations

import re
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, NamedTuple, Self, TypeAlias, TypeVar
from uuid import UUID, uuid4

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError, from_json

from schemas.errors import InvalidIdError, PayloadError
from schemas.limits import (
    DEFAULT_LIMITS,
    MAX_DETAIL_LENGTH,
    MAX_FW_LENGTH,
    MAX_INT,
    MAX_MAGNITUDE,
    MAX_TEXT_LENGTH,
    MAX_TIMESTAMP,
    MAX_TTL_S,
    MAX_UNIT_LENGTH,
    METRIC_NAME_PATTERN,
    Limits,
)
from schemas.topics import ID_PATTERN, Kind, validate_id

__all__ = [
    "MODELS",
    "Command",
    "CommandResult",
    "CommandStatus",
    "Event",
    "Message",
    "MetricKind",
    "MetricValue",
    "Quantity",
    "Reading",
    "Reason",
    "Sample",
    "Scalar",
    "Severity",
    "State",
    "Status",
    "Telemetry",
    "decode",
    "decode_command",
    "decode_command_result",
    "decode_event",
    "decode_status",
    "decode_telemetry",
    "encode",
    "fast_telemetry",
    "metric_problem",
    "reading",
    "readings",
]


class Reason(StrEnum):
    """Why a payload was refused: the `reason` of a PayloadError and of a dead letter."""

    EMPTY = "empty"
    TOO_LARGE = "too_large"
    NOT_UTF8 = "not_utf8"
    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    INVALID = "invalid"
    UNKNOWN_FIELD = "unknown_field"
    TOO_MANY_METRICS = "too_many_metrics"
    TOO_MANY_SAMPLES = "too_many_samples"
    TOO_DEEP = "too_deep"
    BAD_TIMESTAMP = "bad_timestamp"
    FUTURE_TIMESTAMP = "future_timestamp"


_REASONS = frozenset(r.value for r in Reason)


def _error(reason: Reason, message: str, path: str | None = None) -> PydanticCustomError:
    """A validation error whose type is our reason code; `path` extends the field's location."""
    # pydantic formats `{key}` of the context into the message: keep keys out of the text.
    return PydanticCustomError(reason.value, message, {"path": path} if path else None)


class _Context:
    """Per-decode state handed to the validators through pydantic's validation context."""

    __slots__ = ("_bounds", "limits", "now")

    def __init__(self, limits: Limits, now: datetime | None) -> None:
        self.limits = limits
        self.now = now
        self._bounds: tuple[int, int | None] | None = None

    def bounds(self) -> tuple[int, int | None]:
        """(earliest, latest) acceptable ts in epoch ms, once per payload (backlogs have many)."""
        if self._bounds is None:
            limits = self.limits
            earliest, skew_ms = _DEFAULT_MS if limits is DEFAULT_LIMITS else _limit_ms(limits)
            latest = None
            if skew_ms is not None:
                now_ms = time.time_ns() // 1_000_000 if self.now is None else _ts_to_ms(self.now)
                latest = now_ms + skew_ms
            self._bounds = (earliest, latest)
        return self._bounds


@lru_cache(maxsize=64)
def _limit_ms(limits: Limits) -> tuple[int, int | None]:
    skew = limits.max_future_skew
    return _ts_to_ms(limits.min_timestamp), None if skew is None else skew // _MS


def _limits(info: ValidationInfo) -> Limits:
    ctx = info.context
    return ctx.limits if type(ctx) is _Context else DEFAULT_LIMITS


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- timestamps ------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_MAX_MS = (MAX_TIMESTAMP - _EPOCH) // _MS
# RFC 3339 section 5.6; the space separator is the section's own allowed variant.
_RFC3339_PATTERN = (
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_RFC3339 = re.compile(_RFC3339_PATTERN, re.ASCII)
_TS_HELP = (
    "send epoch milliseconds (an integer) or an RFC 3339 string such as '2024-11-22T10:00:00.123Z'"
)


def _iso(dt: datetime) -> str:
    """UTC with milliseconds and Z, the form used in messages and the CLI."""
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_rfc3339(text: str) -> datetime:
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise _error(
            Reason.BAD_TIMESTAMP,
            f"ts {_show(text)} is not an RFC 3339 date-time (date, time and 'Z' or an offset "
            f"such as '+01:00' are all required); {_TS_HELP}",
        )
    if m[6] == "60":
        raise _error(Reason.BAD_TIMESTAMP, f"ts {text!r} is a leap second, which is not supported")
    micro = int((m[7] + "00000")[:6]) if m[7] else 0
    tz: timezone = UTC
    if m[8] is None:
        hours, minutes = int(m[10]), int(m[11])
        if hours > 23 or minutes > 59:
            raise _error(Reason.BAD_TIMESTAMP, f"ts {text!r} has an impossible UTC offset")
        offset = timedelta(hours=hours, minutes=minutes)
        tz = timezone(-offset if m[9] == "-" else offset)
    try:
        dt = datetime(
            int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]), micro, tzinfo=tz
        )
        return dt.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _error(Reason.BAD_TIMESTAMP, f"ts {text!r} is not a valid date-time") from None


def _validate_ts(value: object, info: ValidationInfo) -> datetime:
    ctx = info.context
    earliest, latest = ctx.bounds() if type(ctx) is _Context else _DEFAULT_BOUNDS
    t = type(value)
    if t is int or t is float:
        number: float = value  # type: ignore[assignment]
        # The common case, in integer arithmetic; NaN fails every comparison.
        if earliest <= number <= _MAX_MS and (latest is None or number <= latest):
            if t is int:
                # Integer arithmetic: a double cannot hold epoch seconds to the microsecond.
                return _EPOCH + timedelta(0, number // 1000, number % 1000 * 1000)
            return _EPOCH + timedelta(milliseconds=number)
        dt = _number_ts(number, earliest)
        ms: float = number
    elif t is str:
        dt = _parse_rfc3339(value)  # type: ignore[arg-type]
        ms = _ts_to_ms(dt)
    elif isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise _error(Reason.BAD_TIMESTAMP, "is a naive datetime: give it a timezone")
        dt = value.astimezone(UTC)
        ms = _ts_to_ms(dt)
    else:
        raise _error(Reason.BAD_TIMESTAMP, f"must not be {_a(_json_type(value))}; {_TS_HELP}")
    if ms < earliest:
        raise _error(
            Reason.BAD_TIMESTAMP,
            f"{_show(value)} is {_iso(dt)}, before {_iso(_EPOCH + earliest * _MS)}: send epoch "
            "milliseconds, not seconds, and omit ts while the device clock is not set",
        )
    if latest is not None and ms > latest:
        skew = _limit_ms(ctx.limits)[1] if type(ctx) is _Context else None
        now_ms = latest - (skew or 0)
        raise _error(
            Reason.FUTURE_TIMESTAMP,
            f"{_iso(dt)} is {(ms - now_ms) / 1000:.0f} s ahead of the receive time (at most "
            f"{(skew or 0) / 1000:.0f} s allowed): fix the device clock (NTP) or omit ts",
        )
    return dt


def _number_ts(number: float, earliest: int) -> datetime:
    """The datetime of an epoch-ms number outside the fast path, or why it is no timestamp."""
    if number != number or number in (float("inf"), float("-inf")):
        raise _error(Reason.BAD_TIMESTAMP, f"{number} is not a number; {_TS_HELP}")
    if number < 0:
        raise _error(Reason.BAD_TIMESTAMP, f"{_show(number)} is negative; {_TS_HELP}")
    if number > _MAX_MS:
        raise _error(
            Reason.BAD_TIMESTAMP,
            f"{_show(number)} is after the year 9999 (microseconds or nanoseconds instead "
            f"of milliseconds?); {_TS_HELP}",
        )
    return _EPOCH + timedelta(milliseconds=number)


def _ts_to_ms(dt: datetime) -> int:
    return (dt - _EPOCH) // _MS


_DEFAULT_MS = _limit_ms(DEFAULT_LIMITS)
_DEFAULT_BOUNDS: tuple[int, int | None] = (_DEFAULT_MS[0], None)


_TS_SCHEMA: dict[str, Any] = {
    "description": "Epoch milliseconds, or an RFC 3339 date-time with 'Z' or an offset. "
    f"From {DEFAULT_LIMITS.min_timestamp.date().isoformat()} on; at most "
    f"{int(DEFAULT_LIMITS.max_future_skew.total_seconds())} s ahead of the receiver's clock. "  # type: ignore[union-attr]
    "Omit it and the receive time is used.",
    "anyOf": [
        {
            "type": "number",
            "minimum": (DEFAULT_LIMITS.min_timestamp - _EPOCH) // _MS,
            "maximum": _MAX_MS,
        },
        {"type": "string", "format": "date-time", "pattern": f"^{_RFC3339_PATTERN}$"},
    ],
}

Timestamp = Annotated[
    datetime,
    PlainValidator(_validate_ts),
    PlainSerializer(_ts_to_ms, return_type=int, when_used="json"),
    WithJsonSchema(_TS_SCHEMA),
]
"""A UTC-aware datetime; epoch milliseconds on the wire."""

Counter = Annotated[int, Field(ge=0, le=MAX_INT)]
"""A non-negative int64: `seq`, `boot`."""


# --- metrics ---------------------------------------------------------------------------

Scalar: TypeAlias = bool | int | float | str


@dataclass(frozen=True, slots=True)
class Quantity:
    """A metric value with its unit: `{"v": 21.4, "u": "degC"}` on the wire."""

    v: Scalar
    u: str | None = None


MetricValue: TypeAlias = Scalar | Quantity


class MetricKind(StrEnum):
    """How storage keeps a value: `numeric_values` (numbers, bools as 0/1) or `text_values`."""

    NUMERIC = "numeric"
    BOOL = "bool"
    TEXT = "text"


class Reading(NamedTuple):
    """One metric normalised for storage; a bool is the number 1.0 or 0.0 of kind `bool`."""

    name: str
    value: float | str
    unit: str | None
    kind: MetricKind


_METRIC_NAME_RE = re.compile(METRIC_NAME_PATTERN, re.ASCII)
# Metric names repeat in every message of a device: remember the valid ones so the hot loop
# is a set lookup. Bounded, so junk names cannot grow it; past the bound names are matched.
_known_names: set[str] = set()
_KNOWN_NAMES_MAX = 65536
_VALUE_HELP = 'send a number, a boolean, a string or {"v": value, "u": "unit"}'


def _scalar_problem(value: object) -> str | None:
    """Why `value` is not a metric scalar, or None if it is one."""
    t = type(value)
    if t is bool:
        return None
    if t is int:
        if -MAX_INT <= value <= MAX_INT:  # type: ignore[operator]
            return None
        return (
            f"integer {_show(value)} is outside the int64 range; send it as a float "
            "(e.g. 1.2e20) if precision does not matter"
        )
    if t is float:
        number: float = value  # type: ignore[assignment]
        if -MAX_MAGNITUDE < number < MAX_MAGNITUDE:
            return None
        if number != number:
            return "NaN is not a value; omit the metric when there is no reading"
        if number in (float("inf"), float("-inf")):
            return "Infinity is not a value; send a finite number or omit the metric"
        return f"{number} is out of range (the magnitude must be below {MAX_MAGNITUDE:g})"
    if t is str:
        text: str = value  # type: ignore[assignment]
        if len(text) > MAX_TEXT_LENGTH:
            return f"text is {len(text)} characters long (at most {MAX_TEXT_LENGTH})"
        if "\x00" in text:
            return "text contains a NUL character (\\u0000), which storage cannot hold"
        return None
    if value is None:
        return f"null is not a value; omit the metric when there is no reading, or {_VALUE_HELP}"
    if t is list:
        return (
            "an array is not a value; send one metric per element (name.0, name.1, ...) "
            "or a backlog of samples"
        )
    return f"{_a(_json_type(value))} is not a value; {_VALUE_HELP}"


_MISSING: Any = object()


def _quantity(value: dict[str, Any] | Quantity) -> Quantity | str:
    """The value object as a Quantity, or the reason it is not one."""
    v: Any
    u: Any
    if type(value) is Quantity:
        v, u = value.v, value.u
    else:
        v = value.get("v", _MISSING)  # type: ignore[union-attr]
        u = value.get("u", _MISSING)  # type: ignore[union-attr]
        if v is _MISSING or u is None or len(value) != 1 + (u is not _MISSING):  # type: ignore[arg-type]
            return _quantity_shape_problem(value)  # type: ignore[arg-type]
        if u is _MISSING:
            u = None
    if type(v) is dict:
        return 'a value object cannot nest another ("v")'
    problem = _scalar_problem(v)
    if problem is not None:
        return problem
    if u is not None and (
        type(u) is not str or not 0 < len(u) <= MAX_UNIT_LENGTH or not u.isprintable()
    ):
        if type(u) is not str:
            return f'unit "u" must be a string, not {_a(_json_type(u))}'
        return (
            f'unit "u" {_show(u)} must be 1-{MAX_UNIT_LENGTH} printable characters '
            "(e.g. 'degC', '%RH', 'kW.h')"
        )
    return value if type(value) is Quantity else Quantity(v, u)


def _quantity_shape_problem(value: dict[str, Any]) -> str:
    unknown = sorted(value.keys() - {"v", "u"})
    if unknown:
        return (
            f'unknown key {unknown[0]!r} in a value object: only {{"v": value, "u": unit}} '
            "is allowed (nested objects are not)"
        )
    if "v" not in value:
        return 'a value object needs "v": {"v": value, "u": "unit"}'
    return 'unit "u" is null: omit it, or send a string'


def metric_problem(name: object, value: object) -> str | None:
    """Why ingest would refuse the metric `name: value` (one line), or None if it is valid;
    for senders that drop one bad metric instead of having a whole message refused."""
    if type(name) is not str or _METRIC_NAME_RE.fullmatch(name) is None:
        return (
            f"metric name {_show(name)} is invalid: use 1-64 of A-Z a-z 0-9 _ . - "
            "starting with a letter"
        )
    if type(value) is dict or type(value) is Quantity:
        q = _quantity(value)
        return q if type(q) is str else None
    return _scalar_problem(value)


def _validate_metrics(value: object, info: ValidationInfo) -> dict[str, MetricValue]:
    if type(value) is not dict:
        raise _error(
            Reason.INVALID,
            f'must be an object of name: value, such as {{"temperature": 21.4}}, '
            f"not {_a(_json_type(value))}",
        )
    # JSON input is ours to keep; a caller's dict is copied so the model does not alias it.
    metrics: dict[str, Any] = value if info.mode == "json" else dict(value)
    if not metrics:
        raise _error(Reason.INVALID, "is empty: send at least one metric")
    limits = _limits(info)
    if len(metrics) > limits.max_metrics:
        raise _error(
            Reason.TOO_MANY_METRICS,
            f"has {len(metrics)} metrics (at most {limits.max_metrics} per message or sample); "
            "split them over several messages",
        )
    known = _known_names
    for name, v in metrics.items():
        if name not in known:
            if type(name) is not str or _METRIC_NAME_RE.fullmatch(name) is None:
                raise _error(
                    Reason.INVALID,
                    f"metric name {_show(name)} is invalid: use 1-64 of A-Z a-z 0-9 _ . - "
                    "starting with a letter",
                )
            if len(known) < _KNOWN_NAMES_MAX:
                known.add(name)
        t = type(v)
        # The common cases first, inline: this loop is the ingest hot path.
        if t is float:
            if -MAX_MAGNITUDE < v < MAX_MAGNITUDE:
                continue
        elif t is bool:
            continue
        elif t is int:
            if -MAX_INT <= v <= MAX_INT:
                continue
        elif t is str:
            if len(v) <= MAX_TEXT_LENGTH and "\x00" not in v:
                continue
        elif t is dict or t is Quantity:
            q = _quantity(v)
            if type(q) is str:
                raise _error(Reason.INVALID, q, name)
            metrics[name] = q
            continue
        raise _error(Reason.INVALID, _scalar_problem(v) or "invalid value", name)
    return metrics


_SCALAR_SCHEMAS: list[dict[str, Any]] = [
    {"type": "boolean"},
    {
        "type": "number",
        "exclusiveMinimum": -MAX_MAGNITUDE,
        "exclusiveMaximum": MAX_MAGNITUDE,
        "description": f"Finite; integers must fit int64 (|n| <= {MAX_INT}).",
    },
    {"type": "string", "maxLength": MAX_TEXT_LENGTH},
]
_METRICS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Metric name to value: a number, a boolean, a string, or "
    '{"v": value, "u": "unit"}. Booleans are stored as 1/0, strings as text.',
    "minProperties": 1,
    "maxProperties": DEFAULT_LIMITS.max_metrics,
    "propertyNames": {"pattern": f"^{METRIC_NAME_PATTERN}$"},
    "additionalProperties": {
        "anyOf": [
            *_SCALAR_SCHEMAS,
            {
                "type": "object",
                "description": "A value with its unit.",
                "properties": {
                    "v": {"anyOf": _SCALAR_SCHEMAS},
                    "u": {"type": "string", "minLength": 1, "maxLength": MAX_UNIT_LENGTH},
                },
                "required": ["v"],
                "additionalProperties": False,
            },
        ]
    },
}


def _serialize_metrics(metrics: dict[str, MetricValue]) -> dict[str, Any]:
    # Explicit, because pydantic's own serializer mistakes the Quantity dataclass behind a
    # PlainValidator for a dict and warns; an absent unit is omitted, as on the wire.
    return {
        name: (value if type(value) is not Quantity else _quantity_json(value))
        for name, value in metrics.items()
    }


def _quantity_json(q: Quantity) -> dict[str, Any]:
    return {"v": q.v} if q.u is None else {"v": q.v, "u": q.u}


Metrics = Annotated[
    dict[str, MetricValue],
    PlainValidator(_validate_metrics),
    PlainSerializer(_serialize_metrics, return_type=dict[str, Any]),
    WithJsonSchema(_METRICS_SCHEMA),
]


def reading(name: str, value: MetricValue) -> Reading:
    """Normalise one metric for storage: `(name, value, unit, kind)`."""
    unit = None
    scalar: Scalar
    if isinstance(value, Quantity):
        scalar, unit = value.v, value.u
    else:
        scalar = value
    if isinstance(scalar, bool):
        return Reading(name, 1.0 if scalar else 0.0, unit, MetricKind.BOOL)
    if isinstance(scalar, str):
        return Reading(name, scalar, unit, MetricKind.TEXT)
    # int64 values beyond 2**53 lose precision here: storage is double precision.
    return Reading(name, float(scalar), unit, MetricKind.NUMERIC)


def readings(metrics: dict[str, MetricValue]) -> list[Reading]:
    """Every metric of a `metrics` object, normalised (see `reading`)."""
    return [reading(name, value) for name, value in metrics.items()]


# --- free-form JSON (command args, event data) ---------------------------------------


def _json_problem(
    value: object, depth: int, max_depth: int, path: str
) -> tuple[Reason, str, str] | None:
    """The first problem of a free-form JSON value as (reason, message, path), or None."""
    if isinstance(value, dict | list):
        if depth > max_depth:
            return (
                Reason.TOO_DEEP,
                f"nesting is deeper than {max_depth} levels (the payload object is level 1)",
                path,
            )
        if isinstance(value, list):
            for i, item in enumerate(value):
                problem = _json_problem(item, depth + 1, max_depth, f"{path}[{i}]")
                if problem is not None:
                    return problem
            return None
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if "\x00" in key:
                return Reason.INVALID, "a key contains a NUL character (\\u0000)", sub
            problem = _json_problem(item, depth + 1, max_depth, sub)
            if problem is not None:
                return problem
        return None
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return Reason.INVALID, f"{value} is not allowed; send finite numbers", path
        return None
    if isinstance(value, str):
        if "\x00" in value:
            return Reason.INVALID, "a NUL character (\\u0000) cannot be stored", path
        return None
    if value is None or isinstance(value, int):
        return None
    return Reason.INVALID, f"{_a(type(value).__name__)} is not a JSON value", path


def _check_free_form(value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    # The object itself is level 2: the payload object around it is level 1.
    problem = _json_problem(value, 2, _limits(info).max_depth, "")
    if problem is not None:
        reason, message, path = problem
        raise _error(reason, message, path)
    return value


# --- small field types -----------------------------------------------------------------


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise _error(
            Reason.INVALID, "contains a NUL character (\\u0000), which storage cannot hold"
        )
    return value


def _id_like(what: str) -> AfterValidator:
    def check(value: str) -> str:
        try:
            return validate_id(value, what)
        except InvalidIdError as exc:
            raise _error(Reason.INVALID, str(exc)) from None

    return AfterValidator(check)


def _printable(value: str) -> str:
    if not value.isprintable():
        raise _error(Reason.INVALID, f"{value!r} must be printable characters only")
    return value


_UUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID_RE = re.compile(_UUID_PATTERN, re.ASCII)


def _validate_uuid(value: object) -> UUID:
    if isinstance(value, UUID):
        return value
    if type(value) is str and _UUID_RE.fullmatch(value) is not None:
        return UUID(value)
    raise _error(
        Reason.INVALID,
        f"{_show(value)} is not a UUID in the form 'xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx' "
        "(32 hex digits with hyphens)",
    )


CommandId = Annotated[
    UUID,
    PlainValidator(_validate_uuid),
    PlainSerializer(str, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "format": "uuid",
            "pattern": f"^{_UUID_PATTERN}$",
            "description": "Chosen by the sender of the command; the result repeats it.",
        }
    ),
]

_ID_JSON_SCHEMA = {"type": "string", "pattern": f"^{ID_PATTERN}$"}
CommandName = Annotated[str, _id_like("command name"), WithJsonSchema(_ID_JSON_SCHEMA)]
EventKind = Annotated[str, _id_like("event kind"), WithJsonSchema(_ID_JSON_SCHEMA)]
Text = Annotated[str, Field(max_length=MAX_DETAIL_LENGTH), AfterValidator(_no_nul)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_check_free_form)]


# --- models ----------------------------------------------------------------------------


class _Message(BaseModel):
    """Common configuration: unknown fields are errors, no type coercion, immutable."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        allow_inf_nan=False,
    )


class Sample(_Message):
    """One entry of a telemetry backlog."""

    ts: Timestamp = Field(description="When the sample was taken (required in a backlog).")
    seq: Counter | None = Field(default=None, description="Sequence number of the sample.")
    metrics: Metrics


def _check_samples(value: object, info: ValidationInfo) -> object:
    # Before the items are validated: refuse a huge backlog without building its models.
    if type(value) is list:
        if not value:
            raise _error(Reason.INVALID, "is empty: send at least one sample")
        limit = _limits(info).max_samples
        if len(value) > limit:
            raise _error(
                Reason.TOO_MANY_SAMPLES,
                f"has {len(value)} samples (at most {limit}); send the backlog in several messages",
            )
    return value


Samples = Annotated[
    list[Sample],
    BeforeValidator(_check_samples),
    Field(min_length=1, max_length=DEFAULT_LIMITS.max_samples),
]


class Telemetry(_Message):
    """Measurements: one sample (`metrics`) or a backlog (`samples`), never both."""

    model_config = ConfigDict(
        json_schema_extra={
            # What the model validator enforces; absent and null mean the same.
            "oneOf": [
                {
                    "title": "one sample",
                    "required": ["metrics"],
                    "properties": {"metrics": {"type": "object"}, "samples": {"type": "null"}},
                },
                {
                    "title": "backlog",
                    "required": ["samples"],
                    "properties": {
                        "samples": {"type": "array"},
                        "metrics": {"type": "null"},
                        "ts": {"type": "null"},
                        "seq": {"type": "null"},
                    },
                },
            ]
        }
    )

    ts: Timestamp | None = Field(
        default=None, description="When the sample was taken; absent: the receive time."
    )
    seq: Counter | None = Field(
        default=None, description="Increasing per device; gaps are counted as loss."
    )
    boot: Counter | None = Field(
        default=None,
        description="Boot counter: a restart that resets seq is told apart from loss.",
    )
    metrics: Metrics | None = None
    samples: Samples | None = Field(
        default=None, description="A backlog: samples of one boot, each with its own ts."
    )

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if self.samples is None:
            if self.metrics is None:
                raise _error(
                    Reason.INVALID,
                    "send 'metrics' (one sample) or 'samples' (a backlog); neither is present",
                )
        elif self.metrics is not None:
            raise _error(
                Reason.INVALID,
                "send either 'metrics' (one sample) or 'samples' (a backlog), not both",
            )
        elif self.ts is not None or self.seq is not None:
            raise _error(
                Reason.INVALID,
                "a backlog carries 'ts' and 'seq' in each sample, not at the top level",
            )
        return self

    def iter_samples(self) -> Iterator[tuple[datetime | None, int | None, dict[str, MetricValue]]]:
        """`(ts, seq, metrics)` for each sample, for the single form and for a backlog alike."""
        if self.samples is None:
            assert self.metrics is not None  # the model validator guarantees it
            yield self.ts, self.seq, self.metrics
        else:
            for sample in self.samples:
                yield sample.ts, sample.seq, sample.metrics

    def iter_readings(self) -> Iterator[tuple[datetime | None, int | None, Reading]]:
        """`(ts, seq, reading)` for every metric of every sample."""
        for ts, seq, metrics in self.iter_samples():
            for name, value in metrics.items():
                yield ts, seq, reading(name, value)


class State(StrEnum):
    """A device's presence; `offline` is also its Last Will."""

    ONLINE = "online"
    OFFLINE = "offline"


class Status(_Message):
    """Presence, retained on the status topic; the Will carries the offline form."""

    # Lax only so that Python callers may pass "online"; JSON accepts exactly the values.
    state: State = Field(strict=False)
    ts: Timestamp | None = None
    boot: Counter | None = None
    fw: (
        Annotated[str, Field(min_length=1, max_length=MAX_FW_LENGTH), AfterValidator(_printable)]
        | None
    ) = Field(default=None, description="Firmware version, e.g. '1.0.0'.")


class Command(_Message):
    """A command to a device, published on `fl/{tenant}/{device}/cmd/{name}`."""

    id: CommandId
    name: CommandName = Field(description="Equals the last level of the topic.")
    args: JsonObject = Field(
        default_factory=dict, description="Arguments: a free-form JSON object."
    )
    ts: Timestamp | None = Field(default=None, description="When the command was issued.")
    ttl_s: Annotated[int, Field(ge=1, le=MAX_TTL_S)] | None = Field(
        default=None,
        description="Seconds after ts past which the device answers 'expired' instead.",
    )

    @classmethod
    def new(
        cls,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        ttl_s: int | None = None,
        now: datetime | None = None,
    ) -> Command:
        """A command with a fresh UUID, issued now."""
        return cls(id=uuid4(), name=name, args=args or {}, ts=now or datetime.now(UTC), ttl_s=ttl_s)

    def expires_at(self) -> datetime | None:
        """ts + ttl_s, or None when either is absent."""
        if self.ts is None or self.ttl_s is None:
            return None
        return self.ts + timedelta(seconds=self.ttl_s)


class CommandStatus(StrEnum):
    """How a command ended."""

    OK = "ok"
    ERROR = "error"
    REJECTED = "rejected"
    EXPIRED = "expired"


class CommandResult(_Message):
    """A device's answer to a command, on `fl/{tenant}/{device}/cmd-res`."""

    id: CommandId
    status: CommandStatus = Field(strict=False)
    detail: Text | None = Field(default=None, description="Human-readable detail.")
    ts: Timestamp | None = Field(default=None, description="When the command finished.")


class Severity(StrEnum):
    """Event severity, as in syslog without the noise."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class Event(_Message):
    """An alert or discrete event, on `fl/{tenant}/{device}/events`."""

    ts: Timestamp | None = None
    kind: EventKind = Field(description="What happened, id-like, e.g. 'threshold'.")
    severity: Severity = Field(default=Severity.INFO, strict=False)
    message: Text | None = Field(default=None, description="Human-readable text.")
    data: JsonObject = Field(default_factory=dict, description="Details: a free-form JSON object.")


Message: TypeAlias = Telemetry | Status | Event | Command | CommandResult

MODELS: dict[Kind, type[Message]] = {
    Kind.TELEMETRY: Telemetry,
    Kind.STATUS: Status,
    Kind.EVENTS: Event,
    Kind.COMMAND: Command,
    Kind.COMMAND_RESULT: CommandResult,
}
"""The model of each topic kind."""


# --- decoding --------------------------------------------------------------------------

Payload: TypeAlias = bytes | bytearray | memoryview | str
_BOM = b"\xef\xbb\xbf"
_TOO_DEEP_JSON = "recursion limit exceeded"


def _path(loc: tuple[int | str, ...], extra: str | None) -> str:
    """`samples[2].metrics.temperature` from pydantic's location and our own extension."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    if extra:
        out += extra if extra.startswith("[") or not out else f".{extra}"
    return out


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that holds the field at `loc` (for listing its allowed fields)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = _nested_model(field.annotation) if field is not None else None
        if nested is None:
            return None
        model = nested
    return model


def _nested_model(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _describe(error: Any, model: type[BaseModel]) -> tuple[str, str]:
    """(reason, message without the path) for one pydantic error."""
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    if kind in _REASONS:
        return kind, error["msg"]
    if kind == "extra_forbidden":
        holder = _model_at(model, error["loc"][:-1])
        allowed = ", ".join(holder.model_fields) if holder is not None else "see schemas/README.md"
        return Reason.UNKNOWN_FIELD, f"unknown field (allowed here: {allowed})"
    if kind == "missing":
        return Reason.INVALID, "is required"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return Reason.INVALID, f"must be an object, not {_a(_json_type(value))}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return Reason.INVALID, f"must be an integer, not {_describe_input(value)}"
    if kind in ("string_type", "str_type"):
        return Reason.INVALID, f"must be a string, not {_describe_input(value)}"
    if kind == "list_type":
        return Reason.INVALID, f"must be an array, not {_describe_input(value)}"
    if kind in ("enum", "literal_error"):
        return (
            Reason.INVALID,
            f"must be {ctx.get('expected', 'one of the allowed values')}, not {_show(value)}",
        )
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {
            "greater_than_equal": (">=", "ge"),
            "greater_than": (">", "gt"),
            "less_than_equal": ("<=", "le"),
            "less_than": ("<", "lt"),
        }[kind]
        return Reason.INVALID, f"must be {bound[0]} {ctx.get(bound[1])}, not {_show(value)}"
    if kind in ("string_too_long", "string_too_short"):
        return Reason.INVALID, f"is {len(value)} characters long; {error['msg'].lower()}"
    # Anything else: pydantic's own words, which name the expectation.
    msg: str = error["msg"]
    return Reason.INVALID, msg[:1].lower() + msg[1:] + f" (got {_show(value)})"


def _describe_input(value: object) -> str:
    return f"{_json_type(value)} {_show(value)}" if value is not None else "null"


def _json_error(message: str, payload: bytes) -> PayloadError:
    """Tell bad UTF-8, excessive nesting and other JSON syntax errors apart."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = payload[exc.start : exc.start + 4]
        return PayloadError(
            Reason.NOT_UTF8,
            f"payload is not valid UTF-8 (byte {exc.start}: {bad!r}); payloads are UTF-8 JSON",
        )
    if _TOO_DEEP_JSON in message:
        return PayloadError(Reason.TOO_DEEP, "payload nests objects or arrays far too deep")
    if payload.startswith(_BOM):
        return PayloadError(
            Reason.BAD_JSON, "payload starts with a byte order mark (BOM); send plain UTF-8 JSON"
        )
    detail = message.removeprefix("Invalid JSON: ")
    return PayloadError(Reason.BAD_JSON, f"payload is not valid JSON: {detail}")


def _payload_error(exc: ValidationError, model: type[BaseModel], payload: bytes) -> PayloadError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc: tuple[int | str, ...] = tuple(first["loc"])
    if first["type"] == "json_invalid":
        return _json_error(first["msg"], payload)
    if not loc and first["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return PayloadError(
            Reason.NOT_OBJECT,
            f"payload must be a JSON object {{...}}, not {_a(_json_type(first.get('input')))}",
        )
    reason, message = _describe(first, model)
    path = _path(loc, (first.get("ctx") or {}).get("path"))
    text = f"{path}: {message}" if path else message
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return PayloadError(reason, text, field=path or None)


_M = TypeVar("_M", bound=BaseModel)


def _decode(model: type[_M], payload: Payload, limits: Limits, now: datetime | None) -> _M:
    if not isinstance(payload, bytes):
        if isinstance(payload, bytearray | memoryview):
            payload = bytes(payload)
        elif isinstance(payload, str):
            try:
                payload = payload.encode("utf-8")
            except UnicodeEncodeError:
                raise PayloadError(Reason.NOT_UTF8, "payload is not valid UTF-8") from None
        else:
            raise PayloadError(
                Reason.INVALID, f"payload must be bytes, not {type(payload).__name__}"
            )
    size = len(payload)
    if size > limits.max_payload_bytes:
        raise PayloadError(
            Reason.TOO_LARGE,
            f"payload is {size} bytes (at most {limits.max_payload_bytes}); "
            "send fewer samples or metrics per message",
        )
    if size == 0:
        # On the status topic an empty retained message clears the retained status.
        raise PayloadError(Reason.EMPTY, "payload is empty; send a JSON object")
    if now is not None and now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        return model.model_validate_json(payload, context=_Context(limits, now))
    except ValidationError as exc:
        raise _payload_error(exc, model, payload) from None


# --- the telemetry fast path -----------------------------------------------------------
# pydantic's own JSON parser (`from_json`, so numbers, strings and duplicate keys come out
# as `model_validate_json` sees them) and hand checks of the same rules, for the common
# payload only, without building a model per backlog sample. It answers
# "valid, here are the samples" or "not sure" (None), never "invalid", so every refusal,
# reason and message still comes from `decode_telemetry`. tests/unit/test_fast_telemetry.py
# checks with generated payloads that its answers equal `decode_telemetry`'s.

_TOP_KEYS = frozenset({"ts", "seq", "boot", "metrics", "samples"})
_SAMPLE_KEYS = frozenset({"ts", "seq", "metrics"})

FastSample: TypeAlias = tuple[datetime | None, int | None, dict[str, MetricValue]]


# Below 2**33 s (year 2242) the double nearest to ms / 1000 is within 0.48 µs of it, so
# `fromtimestamp` (rounding half to even) gives exactly the datetime of the integer arithmetic,
# in half the time; tests/unit/test_ingest_rows.py checks the bound.
_FROMTS_MAX_MS = 2**33 * 1000
_fromtimestamp = datetime.fromtimestamp
_US = timedelta(microseconds=1)
# A backlog sample less than a second from the one before is dated from it (datetime
# arithmetic is exact): one addition instead of a conversion. _STEPS[d + 999] is d ms.
_STEPS = tuple(timedelta(milliseconds=d) for d in range(-999, 1000))


def _ms_datetime(ms: int) -> datetime:
    """The datetime of integer epoch ms, as `_validate_ts` computes it."""
    if 0 <= ms < _FROMTS_MAX_MS:
        return _fromtimestamp(ms / 1000, UTC)
    return _EPOCH + timedelta(0, ms // 1000, ms % 1000 * 1000)


def _fast_ts(value: object, bounds: tuple[int, int | None]) -> datetime | None:
    t = type(value)
    if t is int or t is float:
        number: float = value  # type: ignore[assignment]
        earliest, latest = bounds
        if earliest <= number <= _MAX_MS and (latest is None or number <= latest):
            if t is int:
                return _ms_datetime(value)  # type: ignore[arg-type]
            return _EPOCH + timedelta(milliseconds=number)
    return None


def _micros(ts: object, dt: datetime) -> int:
    """Epoch microseconds of a sample's time: exact from integer ms, else from its datetime."""
    if type(ts) is int:
        return ts * 1000
    return (dt - _EPOCH) // _US


def _fast_metrics(value: object, limits: Limits) -> bool:
    """Whether `value` is a metrics object `_validate_metrics` accepts (Quantity in place)."""
    if type(value) is not dict or not value or len(value) > limits.max_metrics:
        return False
    metrics: dict[str, Any] = value
    known = _known_names
    for name, v in metrics.items():
        if name not in known:
            if _METRIC_NAME_RE.fullmatch(name) is None:
                return False
            if len(known) < _KNOWN_NAMES_MAX:
                known.add(name)
        t = type(v)
        if t is float:
            if -MAX_MAGNITUDE < v < MAX_MAGNITUDE:
                continue
        elif t is bool:
            continue
        elif t is int:
            if -MAX_INT <= v <= MAX_INT:
                continue
        elif t is str:
            if len(v) <= MAX_TEXT_LENGTH and "\x00" not in v:
                continue
        elif t is dict:
            q = _quantity(v)
            if type(q) is Quantity:
                metrics[name] = q
                continue
        return False
    return True


def _counter(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_INT


def fast_telemetry(
    payload: bytes,
    *,
    limits: Limits = DEFAULT_LIMITS,
    now: datetime | None = None,
    micros: list[int] | None = None,
) -> tuple[int | None, list[FastSample]] | None:
    """`(boot, [(ts, seq, metrics), ...])` of a plain valid telemetry payload, equal to what
    `decode_telemetry` gives; None when it is not sure (then call `decode_telemetry`).

    With `micros` (and `now`), the epoch microseconds of each sample's time (`now`'s for a
    sample without ts) are appended to it, so a writer needs no datetime arithmetic; after
    an answer of None it may hold some, to be ignored."""
    try:
        if (
            type(payload) is not bytes
            or not 0 < len(payload) <= limits.max_payload_bytes
            or (now is not None and now.tzinfo is None)
        ):
            return None
        doc = from_json(payload, allow_inf_nan=False)
        if type(doc) is not dict or not doc.keys() <= _TOP_KEYS:
            return None
        boot = doc.get("boot")
        if boot is not None and not _counter(boot):
            return None
        bounds = _Context(limits, now).bounds()
        samples = doc.get("samples")
        if samples is None:
            metrics = doc.get("metrics")
            ts = doc.get("ts")
            seq = doc.get("seq")
            raw = ts
            if (
                not _fast_metrics(metrics, limits)
                or (seq is not None and not _counter(seq))
                or (ts is not None and (ts := _fast_ts(ts, bounds)) is None)
            ):
                return None
            if micros is not None and now is not None:
                micros.append(_micros(raw, ts) if ts is not None else (now - _EPOCH) // _US)
            return boot, [(ts, seq, metrics)]  # type: ignore[list-item]
        if (
            type(samples) is not list
            or not samples
            or len(samples) > min(limits.max_samples, DEFAULT_LIMITS.max_samples)
            or doc.get("metrics") is not None
            or doc.get("ts") is not None
            or doc.get("seq") is not None
        ):
            return None
        out: list[FastSample] = []
        append = out.append
        # the checks of `_fast_ts` and `_counter`, inlined: this loop runs once per sample
        earliest, latest = bounds
        top = _MAX_MS if latest is None else min(latest, _MAX_MS)
        us: list[int] = [] if micros is None else micros
        steps = _STEPS
        prev, prev_ts = -(2**70), _EPOCH  # the last integer ts and its datetime
        for sample in samples:
            if type(sample) is not dict:
                return None
            raw = sample.get("ts")
            metrics = sample.get("metrics")
            seq = sample.get("seq")
            # ts and metrics are required below: the keys are exactly these (null counts)
            if len(sample) != (3 if seq is not None or "seq" in sample else 2):
                return None
            if type(raw) is int and earliest <= raw <= top:
                if -1000 < raw - prev < 1000:
                    ts = prev_ts + steps[raw - prev + 999]
                elif 0 <= raw < _FROMTS_MAX_MS:
                    ts = _fromtimestamp(raw / 1000, UTC)
                else:
                    ts = _EPOCH + timedelta(0, raw // 1000, raw % 1000 * 1000)
                prev, prev_ts = raw, ts
                us.append(raw * 1000)
            else:
                ts = _fast_ts(raw, bounds)
                if ts is None:
                    return None
                us.append((ts - _EPOCH) // _US)
            if not _fast_metrics(metrics, limits):
                return None
            if seq is not None and (type(seq) is not int or not 0 <= seq <= MAX_INT):
                return None
            append((ts, seq, metrics))  # type: ignore[arg-type]
        return boot, out
    except Exception:  # anything unusual: the full path decides, with its own message
        return None


def decode_telemetry(
    payload: Payload, *, limits: Limits = DEFAULT_LIMITS, now: datetime | None = None
) -> Telemetry:
    """Validate a telemetry payload; raise PayloadError with a reason code."""
    return _decode(Telemetry, payload, limits, now)


def decode_status(
    payload: Payload, *, limits: Limits = DEFAULT_LIMITS, now: datetime | None = None
) -> Status:
    """Validate a status payload; raise PayloadError (`empty` for a cleared retained status)."""
    return _decode(Status, payload, limits, now)


def decode_event(
    payload: Payload, *, limits: Limits = DEFAULT_LIMITS, now: datetime | None = None
) -> Event:
    """Validate an event payload; raise PayloadError with a reason code."""
    return _decode(Event, payload, limits, now)


def decode_command(
    payload: Payload, *, limits: Limits = DEFAULT_LIMITS, now: datetime | None = None
) -> Command:
    """Validate a command payload; raise PayloadError with a reason code."""
    return _decode(Command, payload, limits, now)


def decode_command_result(
    payload: Payload, *, limits: Limits = DEFAULT_LIMITS, now: datetime | None = None
) -> CommandResult:
    """Validate a command result payload; raise PayloadError with a reason code."""
    return _decode(CommandResult, payload, limits, now)


def decode(
    kind: Kind, payload: Payload, *, limits: Limits = DEFAULT_LIMITS, now: datetime | None = None
) -> Message:
    """Validate the payload of a topic of this kind (see `topics.parse`)."""
    return _decode(MODELS[Kind(kind)], payload, limits, now)


def encode(message: Message) -> bytes:
    """Compact UTF-8 JSON of a message, timestamps as epoch milliseconds, absent fields omitted."""
    return message.model_dump_json(exclude_none=True).encode("utf-8")
