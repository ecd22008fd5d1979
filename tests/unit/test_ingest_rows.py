"""The per-row shortcuts of the ingest path against the arithmetic they replace.

The telemetry fast path dates integer epoch ms with `datetime.fromtimestamp` below 2**33 s,
and a backlog sample less than a second from the one before by adding to that one's
datetime; `decode_message` hands the writer each sample's epoch microseconds. All must give
exactly the datetime of `_validate_ts`'s integer arithmetic (what pydantic stores).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest_worker.decode import decode_message
from ingest_worker.writer import epoch_micros, pg_time
from schemas import messages
from schemas.limits import MAX_TIMESTAMP, Limits
from schemas.messages import decode_telemetry, fast_telemetry

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_MS = (MAX_TIMESTAMP - EPOCH) // timedelta(milliseconds=1)
BOUND = messages._FROMTS_MAX_MS
# no future bound: timestamps up to the year 9999 take the fast path too
OPEN = Limits(max_future_skew=None)
MIN_MS = (OPEN.min_timestamp - EPOCH) // timedelta(milliseconds=1)


def exact(ms: int) -> datetime:
    """`_validate_ts`'s datetime of integer epoch ms."""
    return EPOCH + timedelta(0, ms // 1000, ms % 1000 * 1000)


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.integers(0, BOUND + 10**6),
        st.integers(BOUND - 10**6, BOUND + 10**6),
        st.integers(0, MAX_MS),
    )
)
@example(0)
@example(BOUND - 1)
@example(BOUND)
@example(MAX_MS)
@example(1_733_390_000_999)
def test_ms_datetimes_equal_the_integer_arithmetic(ms: int) -> None:
    got = messages._ms_datetime(ms)
    assert got == exact(ms)
    assert repr(got) == repr(exact(ms))


def _steps(start: int, deltas: list[int]) -> list[int]:
    out = [start]
    for d in deltas:
        out.append(min(max(out[-1] + d, MIN_MS), MAX_MS))
    return out


deltas = st.lists(
    st.one_of(
        st.integers(-1000, 1000),
        st.sampled_from([-1000, -999, -1, 0, 1, 999, 1000, 1001]),
        st.integers(-(10**12), 10**12),
    ),
    min_size=0,
    max_size=40,
)
starts = st.one_of(st.integers(MIN_MS, MAX_MS), st.integers(BOUND - 5000, BOUND + 5000))


@settings(max_examples=400, deadline=None)
@given(starts, deltas)
@example(1_733_390_000_000, [1] * 30)
@example(BOUND - 2, [1, 1, 1, -1, -999, 999, 1000])
@example(MAX_MS - 3, [1, 1, 1, 1])
def test_backlog_sample_times_equal_pydantic(start: int, steps: list[int]) -> None:
    stamps = _steps(start, steps)
    payload = json.dumps(
        {"samples": [{"ts": ms, "metrics": {"v": i}} for i, ms in enumerate(stamps)]}
    ).encode()
    micros: list[int] = []
    fast = fast_telemetry(payload, limits=OPEN, micros=micros)
    assert fast is not None
    slow = decode_telemetry(payload, limits=OPEN)
    got = [ts for ts, _seq, _m in fast[1]]
    want = [ts for ts, _seq, _m in slow.iter_samples()]
    assert [repr(t) for t in got] == [repr(t) for t in want] == [repr(exact(ms)) for ms in stamps]
    assert micros == [ms * 1000 for ms in stamps]


NOW = datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(NOW_MS - 10**9, NOW_MS),
            st.floats(NOW_MS - 10**9, NOW_MS, allow_nan=False),
            st.none(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_decoded_micros_are_the_sample_times(stamps: list[float | None]) -> None:
    # one message per form: a backlog (a sample without ts is refused there) or single ones
    payloads = [
        json.dumps({"ts": ts, "metrics": {"a": 1.5}} if ts is not None else {"metrics": {"a": 1}})
        for ts in stamps
    ]
    dated = [ts for ts in stamps if ts is not None]
    if dated:
        payloads.append(json.dumps({"samples": [{"ts": t, "metrics": {"b": 2}} for t in dated]}))
    for payload in payloads:
        item = decode_message(
            None, "fl/acme/dev-1/telemetry", payload.encode(), NOW.timestamp(), Limits()
        )
        assert item.dead_reason is None, item.dead_error
        assert item.micros is not None
        assert item.micros == [epoch_micros(when) for when, _stamped, _m in item.samples]


def test_a_dead_letter_carries_no_micros() -> None:
    item = decode_message(
        None, "fl/acme/dev-1/telemetry", b'{"metrics":{"a":1}}', NOW.timestamp(), Limits()
    )
    assert item.micros is not None
    item.kill("db_rejected", "refused")
    assert item.micros is None
    assert item.samples == []


def test_pg_time_is_postgres_microseconds_since_2000() -> None:
    assert pg_time(epoch_micros(datetime(2000, 1, 1, tzinfo=UTC))) == 0
    assert pg_time(epoch_micros(datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))) == -1
    # what asyncpg writes for these two (tests/integration/test_ingest_rows.py checks it there)
    assert pg_time(epoch_micros(datetime.max.replace(tzinfo=UTC))) == 2**63 - 1
    assert pg_time(epoch_micros(datetime.min.replace(tzinfo=UTC))) == -(2**63)
