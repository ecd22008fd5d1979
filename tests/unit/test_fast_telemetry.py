"""The telemetry fast path (`schemas.messages.fast_telemetry`) against the pydantic path.

The fast path may only say "valid, these samples" or "not sure". So equivalence is: whenever
it answers, `decode_telemetry` accepts the payload with the same samples, and the worker's
`decode_message` gives the same Decoded (samples, rows, seq, boot, dead letter) with the fast
path on and off. Payloads are generated as JSON text, so that duplicate keys, NaN literals,
escapes, huge numbers and other things `json.dumps` never writes are covered.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest_worker import decode as decode_module
from ingest_worker.decode import Decoded, decode_message
from schemas import messages
from schemas.errors import PayloadError
from schemas.limits import DEFAULT_LIMITS, MAX_INT, MAX_TEXT_LENGTH, MAX_UNIT_LENGTH, Limits
from schemas.messages import decode_telemetry, fast_telemetry, readings

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
LIMITS = [
    DEFAULT_LIMITS,
    Limits(max_future_skew=None),
    Limits(max_metrics=3, max_samples=2),
    Limits(max_samples=5000),  # above the model's own 1000
    Limits(max_payload_bytes=300),
    Limits(min_timestamp=datetime(2026, 6, 1, tzinfo=UTC), max_future_skew=timedelta(seconds=1)),
]


def _obj(pairs: list[tuple[str, str]], sep: str = ",") -> str:
    """A JSON object from (raw key text, raw value text): keys may repeat or carry escapes."""
    return "{" + sep.join(f"{k}:{v}" for k, v in pairs) + "}"


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


names = st.one_of(
    st.sampled_from(["temperature", "t", "a.b-c_d", "x" * 64, "x" * 65, "9lives", "", "_x"]),
    st.sampled_from(['"\\u0074emp"', '"caf\\u00e9"', '"a b"', '"é"']).map(lambda s: "RAW" + s),
    st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,5}", fullmatch=True),
)


def _key(name: str) -> str:
    return name[3:] if name.startswith("RAW") else _q(name)


ints = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, MAX_INT, MAX_INT + 1, -MAX_INT, -MAX_INT - 1, 2**64, 10**30]),
).map(str)
floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(
        [
            "NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "-1e400",
            "1e300",
            "-1e300",
            "9.99e299",
            "1E2",
            "-0",
            "-0.0",
            "1e-400",
            "0.1000000000000000055511151231257827",
            "123456789012345678901234567890.5",
            "01",
            "1.",
            ".5",
            "+1",
        ]
    ),
)
strings = st.one_of(
    st.text(max_size=8).map(_q),
    st.sampled_from(
        [MAX_TEXT_LENGTH - 1, MAX_TEXT_LENGTH, MAX_TEXT_LENGTH + 1, MAX_UNIT_LENGTH + 1]
    ).map(lambda n: _q("é" * n)),
    st.sampled_from(
        ['"a\\u0000b"', '"\\ud800"', '"\\ud83d\\ude00"', '"tab\\there"', '"raw\ttab"', '"\\/"']
    ),
)
scalars = st.one_of(ints, floats, strings, st.sampled_from(["true", "false", "null"]))
units = st.one_of(
    st.sampled_from(['"degC"', '""', "null", "5", '"\\u0007"', '"%RH"', "true"]),
    st.sampled_from([MAX_UNIT_LENGTH, MAX_UNIT_LENGTH + 1]).map(lambda n: _q("u" * n)),
)


# Mostly plausible payloads, so that both paths accept many of them; "wild" draws anything.
# The edge values are in here too: a plausible payload with one value just past a limit.
_plain_scalars = [
    st.integers(-MAX_INT, MAX_INT).map(str),
    st.floats(-1e300, 1e300, allow_nan=False, exclude_min=True, exclude_max=True).map(repr),
    st.text(max_size=6).map(_q),
    st.sampled_from(["true", "false"]),
]
good_scalars = st.one_of(
    *_plain_scalars * 3,
    st.sampled_from([str(MAX_INT + 1), str(-MAX_INT - 1), "1e300", "-1e300", '"\\u0000"']),
    st.sampled_from([MAX_TEXT_LENGTH, MAX_TEXT_LENGTH + 1]).map(lambda n: _q("é" * n)),
)
good_units = st.sampled_from(['"degC"', '"%RH"', '"kW.h"', _q("u" * MAX_UNIT_LENGTH)])


@st.composite
def quantities(draw: st.DrawFn, wild: bool = True) -> str:
    pairs: list[tuple[str, str]] = []
    if not wild:
        pairs.append(('"v"', draw(good_scalars)))
        if draw(st.booleans()):
            pairs.append(('"u"', draw(good_units)))
        return _obj(draw(st.permutations(pairs)))
    if draw(st.booleans()) or draw(st.booleans()):
        pairs.append(('"v"', draw(st.one_of(scalars, st.just('{"v": 1}')))))
    if draw(st.booleans()):
        pairs.append(('"u"', draw(units)))
    if not draw(st.integers(0, 9)):
        pairs.append((draw(st.sampled_from(['"x"', '"v"', '"u"'])), draw(scalars)))
    return _obj(draw(st.permutations(pairs)))


values = st.one_of(
    scalars,
    scalars,
    quantities(),
    st.sampled_from(["[1, 2]", "[]", "{}", '{"a": {"b": 1}}']),
)


@st.composite
def metrics_objects(draw: st.DrawFn, wild: bool = True) -> str:
    if not wild:
        good_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,5}", fullmatch=True).map(_q)
        some_names = st.one_of(*[good_names] * 9, names.map(_key))
        good = st.one_of(good_scalars, good_scalars, quantities(wild=False))
        pairs = [(draw(some_names), draw(good)) for _ in range(draw(st.integers(1, 6)))]
        return _obj(pairs)
    if not draw(st.integers(0, 29)):
        return draw(st.sampled_from(["{}", "[]", "null", "1", '"m"']))
    pairs = [(_key(draw(names)), draw(values)) for _ in range(draw(st.integers(1, 6)))]
    if not draw(st.integers(0, 9)) and pairs:  # a duplicate name
        pairs.append((pairs[0][0], draw(values)))
    return _obj(pairs, draw(st.sampled_from([",", ", ", " ,\n"])))


timestamps = st.one_of(
    st.integers(NOW_MS - 10**9, NOW_MS + 400_000).map(str),
    st.floats(NOW_MS - 10**9, NOW_MS + 400_000).map(repr),
    st.sampled_from(
        [
            str(NOW_MS),
            str(NOW_MS + 300_000),
            str(NOW_MS + 300_001),
            "946684800000",
            "946684799999",
            "946684800",
            "253402300799999",
            "253402300800000",
            "1e400",
            "-1",
            "NaN",
            "true",
            "null",
            '"2026-06-01T11:00:00Z"',
            '"2026-06-01T11:00:00"',
            "[1]",
        ]
    ),
)
counters = st.one_of(
    st.integers(-3, 5).map(str),
    st.sampled_from([str(MAX_INT), str(MAX_INT + 1), "1.0", "true", "null", '"1"']),
)


good_timestamps = st.one_of(
    st.integers(NOW_MS - 10**9, NOW_MS + 400_000).map(str),
    st.floats(NOW_MS - 10**9, NOW_MS + 400_000).map(repr),
    st.sampled_from([NOW_MS + 300_000, NOW_MS + 300_001, 946684800000, 946684799999]).map(str),
    st.sampled_from([NOW_MS + 300_000.5, 946684799999.9]).map(repr),
)
good_counters = st.one_of(
    st.integers(0, MAX_INT).map(str), st.sampled_from(["-1", str(MAX_INT + 1)])
)


@st.composite
def samples(draw: st.DrawFn, wild: bool = True) -> str:
    pairs: list[tuple[str, str]] = []
    if not wild:
        pairs += [('"ts"', draw(good_timestamps)), ('"metrics"', draw(metrics_objects(False)))]
        if draw(st.booleans()):
            pairs.append(('"seq"', draw(good_counters)))
        if not draw(st.integers(0, 9)):
            pairs.append((draw(st.sampled_from(['"boot"', '"extra"'])), "1"))
        return _obj(draw(st.permutations(pairs)))
    if not draw(st.integers(0, 19)):
        return draw(st.sampled_from(["1", "null", "[]", '"s"']))
    if draw(st.integers(0, 9)):
        pairs.append(('"ts"', draw(timestamps)))
    if draw(st.booleans()):
        pairs.append(('"seq"', draw(counters)))
    if draw(st.integers(0, 9)):
        pairs.append(('"metrics"', draw(metrics_objects())))
    if not draw(st.integers(0, 14)):
        pairs.append((draw(st.sampled_from(['"boot"', '"extra"', '"ts"'])), draw(scalars)))
    return _obj(draw(st.permutations(pairs)))


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    if not draw(st.booleans()):
        return draw(good_payloads())
    if not draw(st.integers(0, 29)):
        return draw(st.sampled_from([b"", b"[]", b"1", b"\xef\xbb\xbf{}", b"{", b"\xff", b"{} x"]))
    pairs: list[tuple[str, str]] = []
    backlog = draw(st.booleans())
    if backlog:
        n = draw(st.sampled_from([0, 1, 2, 3]))
        pairs.append(('"samples"', "[" + ",".join(draw(samples()) for _ in range(n)) + "]"))
    if not backlog or not draw(st.integers(0, 4)):
        if draw(st.integers(0, 9)):
            pairs.append(('"metrics"', draw(metrics_objects())))
        if draw(st.booleans()):
            pairs.append(('"ts"', draw(timestamps)))
        if draw(st.booleans()):
            pairs.append(('"seq"', draw(counters)))
    if draw(st.booleans()):
        pairs.append(('"boot"', draw(counters)))
    if not draw(st.integers(0, 9)):  # an unknown field, a repeated one, or an explicit null
        pairs.append(
            (draw(st.sampled_from(['"extra"', '"ts"', '"metrics"', '"samples"'])), draw(scalars))
        )
    text = _obj(draw(st.permutations(pairs)), draw(st.sampled_from([",", ", ", "\n,\t"])))
    encoding = draw(st.sampled_from(["utf-8"] * 8 + ["utf-16", "latin-1"]))
    try:
        return text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


@st.composite
def good_payloads(draw: st.DrawFn) -> bytes:
    pairs: list[tuple[str, str]] = []
    if draw(st.booleans()):
        n = draw(st.integers(1, 3))
        pairs.append(('"samples"', "[" + ",".join(draw(samples(False)) for _ in range(n)) + "]"))
        if not draw(st.integers(0, 4)):
            pairs.append((draw(st.sampled_from(['"ts"', '"seq"', '"metrics"'])), "null"))
        if not draw(st.integers(0, 4)):
            pairs.append(('"ts"', str(NOW_MS)))
        if not draw(st.integers(0, 9)):
            pairs.append(('"seq"', "1"))
        if not draw(st.integers(0, 9)):
            pairs.append(('"metrics"', '{"a": 1}'))
    else:
        pairs.append(('"metrics"', draw(metrics_objects(False))))
        if draw(st.booleans()):
            pairs.append(('"ts"', draw(good_timestamps)))
        if draw(st.booleans()):
            pairs.append(('"seq"', draw(good_counters)))
    if draw(st.booleans()):
        pairs.append(('"boot"', draw(good_counters)))
    return _obj(draw(st.permutations(pairs))).encode()


def _norm(samples: Any) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """Type-exact: True == 1 == 1.0 and 0.0 == -0.0 in Python, not here."""
    return [
        (repr(ts), repr(seq), [(k, type(v).__name__, repr(v)) for k, v in metrics.items()])
        for ts, seq, metrics in samples
    ]


def _decoded(item: Decoded) -> tuple[Any, ...]:
    rows = [(repr(ts), stamped, readings(m)) for ts, stamped, m in item.samples]
    return (
        _norm((ts, stamped, m) for ts, stamped, m in item.samples),
        rows,
        item.nrows,
        repr(item.oldest),
        item.seq,
        item.first_seq,
        item.boot,
        item.dead_reason,
        item.dead_error,
    )


def _check(payload: bytes, limits: Limits) -> bool:
    """Assert the equivalence for one payload; True when the fast path answered."""
    fast = fast_telemetry(payload, limits=limits, now=NOW)
    if fast is not None:
        # A fresh cache of valid metric names: one the fast path filled must not vouch.
        try:
            with mock.patch.object(messages, "_known_names", set()):
                slow = decode_telemetry(payload, limits=limits, now=NOW)
        except PayloadError as exc:
            raise AssertionError(f"fast path accepted what pydantic refuses: {exc}") from None
        assert fast[0] == slow.boot
        assert type(fast[0]) is type(slow.boot)
        assert _norm(fast[1]) == _norm(slow.iter_samples())
    received = NOW.timestamp()
    with_fast = decode_message(None, "fl/acme/dev-1/telemetry", payload, received, limits)
    with (
        mock.patch.object(decode_module, "fast_telemetry", return_value=None),
        mock.patch.object(messages, "_known_names", set()),
    ):
        without = decode_message(None, "fl/acme/dev-1/telemetry", payload, received, limits)
    assert _decoded(with_fast) == _decoded(without)
    return fast is not None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads(), st.sampled_from(LIMITS))
@example(b'{"metrics": {"a": 1, "a": true}}', DEFAULT_LIMITS)
@example(b'{"metrics": {"a": 1}, "metrics": {"b": 2}}', DEFAULT_LIMITS)
@example(b'{"metrics": {"a": 1, "b": 2, "c": 3, "a": 4}}', Limits(max_metrics=3))
@example(b'{"metrics": {"a": 1, "b": 2, "c": 3, "d": 4}}', Limits(max_metrics=3))
@example(b'{"metrics": {"a": NaN}}', DEFAULT_LIMITS)
@example(b'{"metrics": {"a": "\\ud800"}}', DEFAULT_LIMITS)  # json.loads takes it, pydantic not
@example(b'{"metrics": {"a": "\\u0000"}}', DEFAULT_LIMITS)
@example(b'{"ts": null, "seq": null, "boot": null, "metrics": {"a": 1}}', DEFAULT_LIMITS)
@example(b'{"samples": [{"ts": 1780315200000, "metrics": {"a": 1}}], "ts": null}', DEFAULT_LIMITS)
@example(
    json.dumps({"samples": [{"ts": NOW_MS, "metrics": {"a": 1}}] * 1001}).encode(),
    Limits(max_samples=5000, max_payload_bytes=10**6),
)
@example(
    b'{"samples": [{"ts": 1780315200000, "metrics": {"a": 1}}], "metrics": {"a": 1}}',
    DEFAULT_LIMITS,
)
@example(b'{"samples": [{"ts": 1780315200000, "metrics": {"a": 1}}], "seq": 1}', DEFAULT_LIMITS)
@example(b'{"samples": [{"ts": 1780315200000, "metrics": {"a": 1}, "boot": 1}]}', DEFAULT_LIMITS)
@example(b'{"metrics": {"a": 1}, "extra": 1}', DEFAULT_LIMITS)
@example(b'{"metrics": {"9lives": 1}}', DEFAULT_LIMITS)
@example(b'{"metrics": {"": 1}}', DEFAULT_LIMITS)
@example(('{"metrics": {"%s": 1}}' % ("x" * 65)).encode(), DEFAULT_LIMITS)
@example(b'{"metrics": {"t": {"v": 1, "u": ""}}}', DEFAULT_LIMITS)
@example(b'{"metrics": {"t": {"v": 1, "u": null}}}', DEFAULT_LIMITS)
@example(b'{"metrics": {"t": {"v": {"v": 1}}}}', DEFAULT_LIMITS)
@example(b'{"metrics": {"t": true}, "seq": true}', DEFAULT_LIMITS)
@example(b'{"metrics": {"t": 1}, "ts": true}', DEFAULT_LIMITS)
def test_fast_path_equals_pydantic(payload: bytes, limits: Limits) -> None:
    _check(payload, limits)


def _sample(ts: int, seq: int, n: int) -> dict[str, Any]:
    return {"ts": ts, "seq": seq, "metrics": {f"m{i}": 20.5 + i for i in range(n)}}


def test_fast_path_answers_the_common_payloads() -> None:
    """It must not just always say "not sure" (that would pass the test above)."""
    common = [
        {"ts": NOW_MS, "seq": 7, "boot": 2, "metrics": {"t": 21.5, "on": True, "n": 3}},
        {"metrics": {"t": {"v": 21.5, "u": "degC"}, "mode": "auto", "v": {"v": 1}}},
        {"ts": NOW_MS + 0.5, "metrics": {"t": -0.0}},
        {"boot": 1, "samples": [_sample(NOW_MS - 1000 * i, i, 100) for i in range(100)]},
        {"samples": [_sample(NOW_MS, 0, 1), {"ts": NOW_MS, "metrics": {"s": "x" * 256}}]},
    ]
    for doc in common:
        payload = json.dumps(doc).encode()
        assert _check(payload, DEFAULT_LIMITS), doc


def test_decode_message_uses_the_fast_path() -> None:
    payload = json.dumps({"seq": 1, "metrics": {"t": 1.5}}).encode()
    with mock.patch.object(decode_module, "decode_telemetry", side_effect=AssertionError):
        item = decode_message(None, "fl/acme/d/telemetry", payload, time.time(), DEFAULT_LIMITS)
    assert not item.dead
    assert (item.seq, item.nrows) == (1, 2)
