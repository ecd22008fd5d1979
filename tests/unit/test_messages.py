"""Message models and decoding of schemas.messages: valid forms, refusals with reasons, fuzzing."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import PayloadError, SchemaError
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
    reading,
    readings,
)
from schemas.topics import Kind

# A fixed receive time keeps the future-timestamp check deterministic.
NOW = datetime(2024, 11, 22, 12, 0, tzinfo=UTC)
TS_MS = 1732269600123  # 2024-11-22T10:00:00.123Z
TS = datetime(2024, 11, 22, 10, 0, 0, 123000, tzinfo=UTC)
UUID_TEXT = "6f1c3c3e-8f0a-4a8e-9d55-2b7c1f0e4a10"


def _bytes(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _telemetry(**fields: Any) -> bytes:
    return _bytes({"metrics": {"a": 1}} | fields)


# --- valid payloads --------------------------------------------------------------------


def test_single_telemetry_from_the_design() -> None:
    payload = (
        b'{"ts": 1732269600123, "seq": 17, "boot": 3, "metrics": {"temperature": 21.43, '
        b'"on": true, "mode": "auto", "humidity": {"v": 45.1, "u": "%RH"}}}'
    )
    t = decode_telemetry(payload, now=NOW)
    assert (t.ts, t.seq, t.boot, t.samples) == (TS, 17, 3, None)
    assert t.ts is not None
    assert t.ts.tzinfo is UTC
    assert t.metrics == {
        "temperature": 21.43,
        "on": True,
        "mode": "auto",
        "humidity": Quantity(45.1, "%RH"),
    }
    assert type(t.metrics["on"]) is bool  # not the number 1
    assert list(t.iter_samples()) == [(TS, 17, t.metrics)]
    assert [r for _, _, r in t.iter_readings()] == [
        Reading("temperature", 21.43, None, MetricKind.NUMERIC),
        Reading("on", 1.0, None, MetricKind.BOOL),
        Reading("mode", "auto", None, MetricKind.TEXT),
        Reading("humidity", 45.1, "%RH", MetricKind.NUMERIC),
    ]


def test_backlog_telemetry() -> None:
    payload = _bytes(
        {
            "boot": 4,
            "samples": [
                {"ts": TS_MS, "seq": 1, "metrics": {"a": 1, "b": False}},
                {"ts": "2024-11-22T11:00:00.123+01:00", "seq": 2, "metrics": {"a": 2}},
                {"ts": "2024-11-22t10:00:01Z", "metrics": {"a": {"v": 3}}},
            ],
        }
    )
    t = decode_telemetry(payload, now=NOW)
    assert (t.boot, t.metrics, t.ts) == (4, None, None)
    assert list(t.iter_samples()) == [
        (TS, 1, {"a": 1, "b": False}),
        (TS, 2, {"a": 2}),
        (datetime(2024, 11, 22, 10, 0, 1, tzinfo=UTC), None, {"a": Quantity(3)}),
    ]
    assert [(seq, r.name, r.value, r.kind) for _, seq, r in t.iter_readings()] == [
        (1, "a", 1.0, MetricKind.NUMERIC),
        (1, "b", 0.0, MetricKind.BOOL),
        (2, "a", 2.0, MetricKind.NUMERIC),
        (None, "a", 3.0, MetricKind.NUMERIC),
    ]


def test_telemetry_without_ts_leaves_it_to_the_worker() -> None:
    t = decode_telemetry(b'{"metrics": {"x.y_z-1": -0.5}}', now=NOW)
    assert (t.ts, t.seq, t.boot) == (None, None, None)
    assert list(t.iter_samples()) == [(None, None, {"x.y_z-1": -0.5})]


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (TS_MS, TS),
        (946684800000, datetime(2000, 1, 1, tzinfo=UTC)),
        (1732269600123.5, TS + timedelta(microseconds=500)),
        ("2024-11-22T10:00:00.123Z", TS),
        ("2024-11-22T10:00:00.123456789Z", TS + timedelta(microseconds=456)),
        ("2024-11-22 05:30:00.123-04:30", TS),
        ("2024-11-22T10:00:00+00:00", TS.replace(microsecond=0)),
    ],
)
def test_timestamp_forms(ts: object, expected: datetime) -> None:
    t = decode_telemetry(_telemetry(ts=ts), now=NOW)
    assert t.ts == expected
    assert t.ts is not None
    assert t.ts.utcoffset() == timedelta(0)


@given(ms=st.integers(min_value=946684800000, max_value=253402300799999))
def test_epoch_milliseconds_are_exact(ms: int) -> None:
    t = decode_telemetry(_telemetry(ts=ms), limits=replace(DEFAULT_LIMITS, max_future_skew=None))
    assert t.ts == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert json.loads(encode(t))["ts"] == ms


def test_status_forms() -> None:
    s = decode_status(b'{"state": "online", "ts": 1732269600123, "boot": 3, "fw": "1.0.0"}')
    assert (s.state, s.ts, s.boot, s.fw) == (State.ONLINE, TS, 3, "1.0.0")
    will = decode_status(b'{"state": "offline"}')
    assert will == Status(state=State.OFFLINE)
    assert encode(will) == b'{"state":"offline"}'


def test_command_and_result() -> None:
    c = decode_command(
        _bytes(
            {
                "id": UUID_TEXT,
                "name": "set-interval",
                "args": {"seconds": 5, "sensors": ["t1", {"x": None}]},
                "ts": TS_MS,
                "ttl_s": 60,
            }
        ),
        now=NOW,
    )
    assert c.id == UUID(UUID_TEXT)
    assert (c.name, c.args, c.ts, c.ttl_s) == (
        "set-interval",
        {"seconds": 5, "sensors": ["t1", {"x": None}]},
        TS,
        60,
    )
    assert c.expires_at() == TS + timedelta(seconds=60)
    minimal = decode_command(_bytes({"id": UUID_TEXT.upper(), "name": "reset"}))
    assert (minimal.args, minimal.ts, minimal.expires_at()) == ({}, None, None)
    r = decode_command_result(_bytes({"id": UUID_TEXT, "status": "rejected", "detail": "busy"}))
    assert (r.id, r.status, r.detail, r.ts) == (
        UUID(UUID_TEXT),
        CommandStatus.REJECTED,
        "busy",
        None,
    )


def test_command_new() -> None:
    c = Command.new("reset", ttl_s=30, now=TS)
    assert (c.name, c.args, c.ts, c.ttl_s) == ("reset", {}, TS, 30)
    assert c.id.version == 4
    assert c.id != Command.new("reset").id
    assert decode_command(encode(c)) == c


def test_event() -> None:
    e = decode_event(
        _bytes(
            {
                "ts": TS_MS,
                "kind": "threshold",
                "severity": "critical",
                "message": "temperature above 80 degC",
                "data": {"metric": "temperature", "value": 81.5, "limit": 80},
            }
        ),
        now=NOW,
    )
    assert (e.kind, e.severity, e.message) == (
        "threshold",
        Severity.CRITICAL,
        "temperature above 80 degC",
    )
    assert e.data == {"metric": "temperature", "value": 81.5, "limit": 80}
    bare = decode_event(b'{"kind": "door-open"}')
    assert (bare.severity, bare.message, bare.data, bare.ts) == (Severity.INFO, None, {}, None)


@pytest.mark.parametrize(
    ("kind", "payload", "model"),
    [
        (Kind.TELEMETRY, b'{"metrics": {"a": 1}}', Telemetry),
        (Kind.STATUS, b'{"state": "online"}', Status),
        (Kind.EVENTS, b'{"kind": "boot"}', Event),
        (Kind.COMMAND, _bytes({"id": UUID_TEXT, "name": "reset"}), Command),
        (Kind.COMMAND_RESULT, _bytes({"id": UUID_TEXT, "status": "ok"}), CommandResult),
        ("cmd-res", _bytes({"id": UUID_TEXT, "status": "expired"}), CommandResult),
    ],
)
def test_decode_dispatches_on_the_topic_kind(kind: Kind, payload: bytes, model: type) -> None:
    assert type(decode(kind, payload)) is model


def test_payload_may_be_bytearray_memoryview_or_str() -> None:
    raw = b'{"metrics": {"a": 1}}'
    expected = decode_telemetry(raw)
    assert decode_telemetry(bytearray(raw)) == expected
    assert decode_telemetry(memoryview(raw)) == expected
    assert decode_telemetry(raw.decode()) == expected


@pytest.mark.parametrize(
    "message",
    [
        Telemetry(ts=TS, seq=1, boot=2, metrics={"a": 1.5, "b": True, "c": "x"}),
        Telemetry(metrics={"q": Quantity(2, "kW"), "r": Quantity("on")}),
        Telemetry(boot=1, samples=[{"ts": TS, "metrics": {"a": 1}}]),  # type: ignore[list-item]
        Status(state=State.ONLINE, fw="2.0.0-rc.1"),
        Command(id=UUID(UUID_TEXT), name="reset", args={"hard": True}, ttl_s=5),
        CommandResult(id=UUID(UUID_TEXT), status=CommandStatus.ERROR, detail="x", ts=TS),
        Event(kind="threshold", severity=Severity.WARNING, data={"a": [1, 2]}),
    ],
)
def test_encode_decode_round_trip(message: Any) -> None:
    wire = encode(message)
    assert b" " not in wire.replace(b"2.0.0-rc.1", b"")  # compact
    assert b"null" not in wire  # absent fields stay absent
    assert decode(_kind_of(message), wire) == message


def _kind_of(message: object) -> Kind:
    kinds: dict[type, Kind] = {
        Telemetry: Kind.TELEMETRY,
        Status: Kind.STATUS,
        Event: Kind.EVENTS,
        Command: Kind.COMMAND,
        CommandResult: Kind.COMMAND_RESULT,
    }
    return kinds[type(message)]


def test_encode_writes_epoch_milliseconds() -> None:
    wire = encode(Telemetry(ts=TS + timedelta(microseconds=999), metrics={"a": 1}))
    assert wire == b'{"ts":1732269600123,"metrics":{"a":1}}'


def test_python_construction_does_not_alias_or_mutate_the_callers_dict() -> None:
    metrics: dict[str, Any] = {"q": {"v": 1, "u": "V"}}
    t = Telemetry(metrics=metrics)
    assert t.metrics == {"q": Quantity(1, "V")}
    assert metrics == {"q": {"v": 1, "u": "V"}}
    assert t.metrics is not metrics


def test_python_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="NaN is not a value"):
        Telemetry(metrics={"a": float("nan")})
    with pytest.raises(ValueError, match="naive datetime"):
        Telemetry(ts=datetime(2024, 1, 1), metrics={"a": 1})
    with pytest.raises(ValueError, match="1-32 printable"):
        Telemetry(metrics={"a": Quantity(1, "")})


def test_reading_normalisation() -> None:
    assert reading("on", False) == Reading("on", 0.0, None, MetricKind.BOOL)
    assert reading("n", 7) == Reading("n", 7.0, None, MetricKind.NUMERIC)
    assert type(reading("n", 7).value) is float
    assert reading("s", Quantity("open", "state")) == Reading("s", "open", "state", MetricKind.TEXT)
    assert reading("b", Quantity(True)) == Reading("b", 1.0, None, MetricKind.BOOL)
    assert readings({"a": 1, "b": "x"}) == [
        Reading("a", 1.0, None, MetricKind.NUMERIC),
        Reading("b", "x", None, MetricKind.TEXT),
    ]


# --- refusals --------------------------------------------------------------------------

_DEEP_ARGS: dict[str, Any] = {
    "id": UUID_TEXT,
    "name": "r",
    "args": {"a": {"b": {"c": {"d": {"e": {"f": {}}}}}}},
}
_DEEP_ARGS["args"]["a"]["b"]["c"]["d"]["e"]["f"] = {"g": {"h": 1}}
_SAMPLE = {"ts": TS_MS, "metrics": {"a": 1}}

BAD_TELEMETRY: list[tuple[str, bytes, Reason, str]] = [
    ("invalid UTF-8", b'{"metrics": {"a": "\xff"}}', Reason.NOT_UTF8, "not valid UTF-8 (byte 19"),
    ("latin-1 outside strings", b"\xe9", Reason.NOT_UTF8, "not valid UTF-8"),
    ("empty payload", b"", Reason.EMPTY, "payload is empty"),
    ("whitespace only", b"  ", Reason.BAD_JSON, "not valid JSON"),
    ("truncated JSON", b'{"metrics": {"a": 1}', Reason.BAD_JSON, "EOF while parsing"),
    ("trailing garbage", b'{"metrics": {"a": 1}} x', Reason.BAD_JSON, "trailing characters"),
    ("byte order mark", b'\xef\xbb\xbf{"metrics": {"a": 1}}', Reason.BAD_JSON, "byte order mark"),
    ("JSON array", b"[1, 2]", Reason.NOT_OBJECT, "must be a JSON object {...}, not an array"),
    ("JSON string", b'"hello"', Reason.NOT_OBJECT, "not a string"),
    ("JSON null", b"null", Reason.NOT_OBJECT, "not a null"),
    ("NaN", b'{"metrics": {"a": NaN}}', Reason.INVALID, "metrics.a: NaN is not a value"),
    ("Infinity", b'{"metrics": {"a": Infinity}}', Reason.INVALID, "metrics.a: Infinity"),
    ("-Infinity", b'{"metrics": {"a": -Infinity}}', Reason.INVALID, "metrics.a: Infinity"),
    ("1e400", b'{"metrics": {"a": 1e400}}', Reason.INVALID, "metrics.a: Infinity"),
    ("1e300", b'{"metrics": {"a": -1e300}}', Reason.INVALID, "out of range"),
    ("int beyond int64", _telemetry(metrics={"a": 2**63}), Reason.INVALID, "outside the int64"),
    ("huge int", b'{"metrics": {"a": ' + b"9" * 5000 + b"}}", Reason.BAD_JSON, "out of range"),
    ("bool as ts", _telemetry(ts=True), Reason.BAD_TIMESTAMP, "ts: must not be a boolean"),
    ("null-ish ts", _telemetry(ts=[1]), Reason.BAD_TIMESTAMP, "ts: must not be an array"),
    ("negative ts", _telemetry(ts=-1), Reason.BAD_TIMESTAMP, "ts: -1 is negative"),
    ("seconds as ts", _telemetry(ts=1732269600), Reason.BAD_TIMESTAMP, "not seconds"),
    ("year 10000", _telemetry(ts=253402300800000), Reason.BAD_TIMESTAMP, "after the year 9999"),
    ("ns as ts", _telemetry(ts=1732269600123000000), Reason.BAD_TIMESTAMP, "nanoseconds"),
    ("far future", _telemetry(ts=TS_MS + 86_400_000), Reason.FUTURE_TIMESTAMP, "ahead of the"),
    ("future string", _telemetry(ts="2030-01-01T00:00:00Z"), Reason.FUTURE_TIMESTAMP, "NTP"),
    ("naive RFC 3339", _telemetry(ts="2024-11-22T10:00:00"), Reason.BAD_TIMESTAMP, "RFC 3339"),
    ("date only", _telemetry(ts="2024-11-22"), Reason.BAD_TIMESTAMP, "RFC 3339"),
    ("Feb 30", _telemetry(ts="2024-02-30T10:00:00Z"), Reason.BAD_TIMESTAMP, "not a valid date"),
    ("leap second", _telemetry(ts="2016-12-31T23:59:60Z"), Reason.BAD_TIMESTAMP, "leap second"),
    ("bad offset", _telemetry(ts="2024-11-22T10:00:00+24:00"), Reason.BAD_TIMESTAMP, "offset"),
    ("NaN ts", b'{"ts": NaN, "metrics": {"a": 1}}', Reason.BAD_TIMESTAMP, "nan is not a number"),
    (
        "too many metrics",
        _bytes({"metrics": {f"m{i}": i for i in range(257)}}),
        Reason.TOO_MANY_METRICS,
        "metrics: has 257 metrics (at most 256",
    ),
    (
        "too many samples",
        _bytes({"samples": [_SAMPLE] * 1001}),
        Reason.TOO_MANY_SAMPLES,
        "samples: has 1001 samples (at most 1000)",
    ),
    ("1 MB payload", _telemetry(pad="x" * 1_000_000), Reason.TOO_LARGE, "(at most 262144)"),
    ("deep nesting", b"[" * 5000 + b"]" * 5000, Reason.TOO_DEEP, "far too deep"),
    ("unknown field", _telemetry(temp=1), Reason.UNKNOWN_FIELD, "temp: unknown field"),
    (
        "unknown field in a sample",
        _bytes({"samples": [_SAMPLE | {"boot": 1}]}),
        Reason.UNKNOWN_FIELD,
        "samples[0].boot: unknown field (allowed here: ts, seq, metrics)",
    ),
    ("null metric", _telemetry(metrics={"a": None}), Reason.INVALID, "metrics.a: null is not"),
    ("array metric", _telemetry(metrics={"a": [1]}), Reason.INVALID, "an array is not a value"),
    (
        "nested metric object",
        _telemetry(metrics={"a": {"b": 1}}),
        Reason.INVALID,
        "metrics.a: unknown key 'b' in a value object",
    ),
    (
        "nested value object",
        _telemetry(metrics={"a": {"v": {"v": 1}}}),
        Reason.INVALID,
        "cannot nest another",
    ),
    ("value object without v", _telemetry(metrics={"a": {"u": "V"}}), Reason.INVALID, 'needs "v"'),
    ("null unit", _telemetry(metrics={"a": {"v": 1, "u": None}}), Reason.INVALID, "omit it"),
    ("long unit", _telemetry(metrics={"a": {"v": 1, "u": "x" * 33}}), Reason.INVALID, "1-32"),
    ("numeric unit", _telemetry(metrics={"a": {"v": 1, "u": 5}}), Reason.INVALID, "not a number"),
    ("long text", _telemetry(metrics={"a": "x" * 257}), Reason.INVALID, "257 characters long"),
    ("NUL in text", _telemetry(metrics={"a": "x\u0000"}), Reason.INVALID, "NUL character"),
    ("bad metric name", _telemetry(metrics={"1abc": 1}), Reason.INVALID, "metric name '1abc'"),
    ("name with newline", _telemetry(metrics={"abc\n": 1}), Reason.INVALID, "metric name"),
    ("65-char name", _telemetry(metrics={"a" * 65: 1}), Reason.INVALID, "metric name"),
    ("metrics not object", _telemetry(metrics=[1]), Reason.INVALID, "metrics: must be an object"),
    ("empty metrics", _telemetry(metrics={}), Reason.INVALID, "metrics: is empty"),
    ("neither form", _bytes({"seq": 1}), Reason.INVALID, "neither is present"),
    (
        "both metrics and samples",
        _telemetry(samples=[_SAMPLE]),
        Reason.INVALID,
        "either 'metrics' (one sample) or 'samples' (a backlog), not both",
    ),
    ("backlog with top ts", _bytes({"ts": TS_MS, "samples": [_SAMPLE]}), Reason.INVALID, "each"),
    ("empty samples", _bytes({"samples": []}), Reason.INVALID, "samples: is empty"),
    ("sample without ts", _bytes({"samples": [{"metrics": {"a": 1}}]}), Reason.INVALID, "ts: is"),
    ("sample not object", _bytes({"samples": [1]}), Reason.INVALID, "samples[0]: must be an"),
    ("negative seq", _telemetry(seq=-1), Reason.INVALID, "seq: must be >= 0, not -1"),
    ("float seq", _telemetry(seq=1.0), Reason.INVALID, "seq: must be an integer, not number"),
    ("string seq", _telemetry(seq="1"), Reason.INVALID, "seq: must be an integer, not string"),
    ("bool boot", _telemetry(boot=True), Reason.INVALID, "boot: must be an integer, not boolean"),
    ("seq beyond int64", _telemetry(seq=2**63), Reason.INVALID, "seq: must be <= 92233"),
]


@pytest.mark.parametrize(
    ("payload", "reason", "fragment"),
    [pytest.param(p, r, f, id=name) for name, p, r, f in BAD_TELEMETRY],
)
def test_bad_telemetry(payload: bytes, reason: Reason, fragment: str) -> None:
    with pytest.raises(PayloadError) as caught:
        decode_telemetry(payload, now=NOW)
    assert caught.value.reason == reason, str(caught.value)
    assert fragment in str(caught.value)


BAD_OTHERS: list[tuple[str, Kind, Any, Reason, str]] = [
    ("bad state", Kind.STATUS, {"state": "on"}, Reason.INVALID, "'online' or 'offline', not 'on'"),
    ("no state", Kind.STATUS, {"fw": "1"}, Reason.INVALID, "state: is required"),
    ("empty fw", Kind.STATUS, {"state": "online", "fw": ""}, Reason.INVALID, "fw: is 0 char"),
    ("fw newline", Kind.STATUS, {"state": "online", "fw": "1\n"}, Reason.INVALID, "printable"),
    ("cleared retained status", Kind.STATUS, b"", Reason.EMPTY, "payload is empty"),
    ("bad uuid", Kind.COMMAND, {"id": "42", "name": "reset"}, Reason.INVALID, "id: '42' is not"),
    (
        "hex-only uuid",
        Kind.COMMAND,
        {"id": UUID_TEXT.replace("-", ""), "name": "reset"},
        Reason.INVALID,
        "not a UUID",
    ),
    ("numeric uuid", Kind.COMMAND_RESULT, {"id": 1, "status": "ok"}, Reason.INVALID, "not a UUID"),
    (
        "bad command name",
        Kind.COMMAND,
        {"id": UUID_TEXT, "name": "Reset!"},
        Reason.INVALID,
        "name: command name 'Reset!' is invalid",
    ),
    (
        "args not object",
        Kind.COMMAND,
        {"id": UUID_TEXT, "name": "r", "args": [1]},
        Reason.INVALID,
        "args: must be an object, not an array",
    ),
    ("deep args", Kind.COMMAND, _DEEP_ARGS, Reason.TOO_DEEP, "args.a.b.c.d.e.f.g: nesting"),
    (
        "NaN in args",
        Kind.COMMAND,
        b'{"id": "%s", "name": "r", "args": {"x": [1, NaN]}}' % UUID_TEXT.encode(),
        Reason.INVALID,
        "args.x[1]: nan is not allowed",
    ),
    (
        "NUL in event data",
        Kind.EVENTS,
        {"kind": "x", "data": {"k": "a\u0000"}},
        Reason.INVALID,
        "data.k: a NUL character",
    ),
    ("zero ttl", Kind.COMMAND, {"id": UUID_TEXT, "name": "r", "ttl_s": 0}, Reason.INVALID, ">= 1"),
    (
        "bool ttl",
        Kind.COMMAND,
        {"id": UUID_TEXT, "name": "r", "ttl_s": True},
        Reason.INVALID,
        "ttl_s: must be an integer",
    ),
    (
        "bad result status",
        Kind.COMMAND_RESULT,
        {"id": UUID_TEXT, "status": "done"},
        Reason.INVALID,
        "'ok', 'error', 'rejected' or 'expired', not 'done'",
    ),
    (
        "long detail",
        Kind.COMMAND_RESULT,
        {"id": UUID_TEXT, "status": "ok", "detail": "x" * 1025},
        Reason.INVALID,
        "detail: is 1025 characters long",
    ),
    ("no event kind", Kind.EVENTS, {"severity": "info"}, Reason.INVALID, "kind: is required"),
    (
        "bad severity",
        Kind.EVENTS,
        {"kind": "x", "severity": "fatal"},
        Reason.INVALID,
        "severity: must be 'debug', 'info', 'warning', 'error' or 'critical'",
    ),
    ("bad event kind", Kind.EVENTS, {"kind": "Over Temp"}, Reason.INVALID, "event kind"),
    (
        "unknown event field",
        Kind.EVENTS,
        {"kind": "x", "body": {}},
        Reason.UNKNOWN_FIELD,
        "body: unknown field (allowed here: ts, kind, severity, message, data)",
    ),
    (
        "two problems",
        Kind.STATUS,
        {"state": "on", "boot": -1},
        Reason.INVALID,
        "(and 1 more problem)",
    ),
]


@pytest.mark.parametrize(
    ("kind", "payload", "reason", "fragment"),
    [pytest.param(k, p, r, f, id=name) for name, k, p, r, f in BAD_OTHERS],
)
def test_bad_other_payloads(kind: Kind, payload: Any, reason: Reason, fragment: str) -> None:
    raw = payload if isinstance(payload, bytes) else _bytes(payload)
    with pytest.raises(PayloadError) as caught:
        decode(kind, raw, now=NOW)
    assert caught.value.reason == reason, str(caught.value)
    assert fragment in str(caught.value)


def test_payload_error_carries_reason_and_field() -> None:
    with pytest.raises(PayloadError) as caught:
        decode_telemetry(_bytes({"samples": [_SAMPLE, {"ts": TS_MS, "metrics": {"t": None}}]}))
    err = caught.value
    assert err.reason == "invalid"
    assert err.field == "samples[1].metrics.t"
    assert str(err).startswith("samples[1].metrics.t: null is not a value")
    assert isinstance(err, SchemaError)
    assert isinstance(err, ValueError)
    assert "invalid" in repr(err)


def test_size_is_checked_before_parsing() -> None:
    # Not even JSON: only a check made before parsing can call it too large.
    junk = b"\xff" * (DEFAULT_LIMITS.max_payload_bytes + 1)
    with pytest.raises(PayloadError) as caught:
        decode_telemetry(junk)
    assert caught.value.reason == Reason.TOO_LARGE
    exactly = _telemetry(pad="")
    exactly = exactly[:-1] + b" " * (DEFAULT_LIMITS.max_payload_bytes - len(exactly)) + b"}"
    assert len(exactly) == DEFAULT_LIMITS.max_payload_bytes
    with pytest.raises(PayloadError) as caught:  # within the size limit: the parser speaks
        decode_telemetry(exactly)
    assert caught.value.reason == Reason.UNKNOWN_FIELD


def test_custom_limits() -> None:
    small = Limits(max_payload_bytes=64, max_metrics=2, max_samples=2, max_depth=3)
    assert decode_telemetry(b'{"metrics": {"a": 1, "b": 2}}', limits=small).metrics == {
        "a": 1,
        "b": 2,
    }
    cases = [
        (b'{"metrics": {"a": 1, "b": 2, "c": 3}}', Reason.TOO_MANY_METRICS),
        (_bytes({"samples": [_SAMPLE] * 3}), Reason.TOO_LARGE),
        (b'{"samples": [1, 2, 3]}', Reason.TOO_MANY_SAMPLES),
    ]
    for payload, reason in cases:
        with pytest.raises(PayloadError) as caught:
            decode_telemetry(payload, limits=small)
        assert caught.value.reason == reason
    # payload level 1, args 2, a 3, b 4
    command = _bytes({"id": UUID_TEXT, "name": "r", "args": {"a": {"b": {"c": 1}}}})
    with pytest.raises(PayloadError, match="deeper than 3 levels") as caught:
        decode_command(command, limits=replace(small, max_payload_bytes=1000))
    assert caught.value.reason == Reason.TOO_DEEP
    assert decode_command(command, limits=replace(small, max_payload_bytes=1000, max_depth=4))


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="max_metrics must be at least 1"):
        Limits(max_metrics=0)
    with pytest.raises(ValueError, match="timezone-aware"):
        Limits(min_timestamp=datetime(2000, 1, 1))


def test_future_skew_is_relative_to_now_and_can_be_disabled() -> None:
    ahead = _telemetry(ts=TS_MS + 299_000)
    assert decode_telemetry(ahead, now=TS).ts == TS + timedelta(seconds=299)
    with pytest.raises(
        PayloadError, match=r"^ts: \S+ is 301 s ahead of the receive time \(at most 300 s"
    ) as caught:
        decode_telemetry(_telemetry(ts=TS_MS + 301_000), now=TS)
    assert caught.value.reason == Reason.FUTURE_TIMESTAMP
    far = _telemetry(ts="2999-01-01T00:00:00Z")
    lenient = replace(DEFAULT_LIMITS, max_future_skew=None)
    assert decode_telemetry(far, limits=lenient).ts == datetime(2999, 1, 1, tzinfo=UTC)
    # A backlog names the sample at fault.
    with pytest.raises(PayloadError, match=r"^samples\[1\]\.ts: "):
        decode_telemetry(_bytes({"samples": [_SAMPLE, _SAMPLE | {"ts": TS_MS + 10**9}]}), now=TS)
    with pytest.raises(ValueError, match="timezone-aware"):
        decode_telemetry(ahead, now=datetime(2024, 1, 1))


def test_now_defaults_to_the_clock() -> None:
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    assert decode_telemetry(_telemetry(ts=now_ms)).ts is not None
    with pytest.raises(PayloadError) as caught:
        decode_telemetry(_telemetry(ts=now_ms + 3_600_000))
    assert caught.value.reason == Reason.FUTURE_TIMESTAMP


def test_offsets_are_converted_to_utc() -> None:
    t = decode_telemetry(_telemetry(ts="2024-11-22T11:00:00.123+01:00"), now=NOW)
    assert t.ts == TS
    assert t.ts is not None
    assert t.ts.tzinfo is UTC
    plus = datetime(2024, 11, 22, 11, 0, 0, 123000, tzinfo=timezone(timedelta(hours=1)))
    assert Telemetry(ts=plus, metrics={"a": 1}).ts == TS


def test_non_bytes_payload_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="must be bytes, not int") as caught:
        decode_telemetry(5)  # type: ignore[arg-type]
    assert caught.value.reason == Reason.INVALID
    with pytest.raises(PayloadError) as caught:
        decode_telemetry('{"metrics": {"a": "\ud800"}}')
    assert caught.value.reason == Reason.NOT_UTF8


# --- fuzzing ---------------------------------------------------------------------------

KINDS = list(Kind)


def _outcome(kind: Kind, payload: bytes) -> Message | PayloadError:
    """The decoded message, or the PayloadError; any other exception fails the test."""
    try:
        return decode(kind, payload, now=NOW)
    except PayloadError as exc:
        return exc


@settings(max_examples=300)
@given(payload=st.binary(max_size=300), kind=st.sampled_from(KINDS))
def test_arbitrary_bytes_raise_only_payload_errors(payload: bytes, kind: Kind) -> None:
    outcome = _outcome(kind, payload)
    if isinstance(outcome, PayloadError):
        assert outcome.reason in set(Reason)
    else:
        payload.decode("utf-8")  # whatever was accepted is UTF-8


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
keys = st.sampled_from(
    [
        *("ts", "seq", "boot", "metrics", "samples", "state", "fw", "id", "name", "args"),
        *("ttl_s", "status", "detail", "kind", "severity", "message", "data", "v", "u", "x"),
    ]
)
objects = st.dictionaries(keys, json_values, max_size=6)


@settings(max_examples=200)
@given(obj=objects | json_values, kind=st.sampled_from(KINDS))
def test_arbitrary_json_raises_only_payload_errors(obj: Any, kind: Kind) -> None:
    payload = json.dumps(obj, allow_nan=True).encode()
    outcome = _outcome(kind, payload)
    if isinstance(outcome, PayloadError):
        assert outcome.reason in set(Reason)
        assert str(outcome)


metric_values = st.one_of(
    json_values,
    st.fixed_dictionaries({"v": json_values}, optional={"u": json_values}),
)
metric_names = st.one_of(st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,63}", fullmatch=True), st.text())


@settings(max_examples=200)
@given(
    metrics=st.dictionaries(metric_names, metric_values, max_size=5),
    ts=st.one_of(st.none(), json_values, st.integers(), st.datetimes().map(str)),
)
def test_telemetry_shaped_fuzz(metrics: dict[str, Any], ts: Any) -> None:
    payload = json.dumps({"ts": ts, "metrics": metrics}, allow_nan=True).encode()
    t = _outcome(Kind.TELEMETRY, payload)
    if isinstance(t, PayloadError):
        assert t.reason in set(Reason)
        return
    # Accepted: every value normalises, and the message survives a round trip.
    assert isinstance(t, Telemetry)
    assert t.metrics is not None
    for r in readings(t.metrics):
        assert r.kind in set(MetricKind)
        assert isinstance(r.value, float) == (r.kind is not MetricKind.TEXT)
    assert decode_telemetry(encode(t), now=NOW) == t
