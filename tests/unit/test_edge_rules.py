"""Windowed rules: membership, aggregates, conditions, streaks, lateness, time without readings."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import RuleError
from edge_agent.manifest import RuleSpec
from edge_agent.rules import Firing, Rule, RuleEngine, metric_value
from schemas.messages import Event, Quantity, Severity, decode_event

T0 = 1_732_269_600_000  # 2024-11-22T10:00:00Z, a multiple of 10 s, 30 s and 60 s
S = 1000  # one second in ms
ALWAYS = {"op": ">=", "value": -1e9}


def spec(**changes: Any) -> RuleSpec:
    base: dict[str, Any] = {
        "name": "overheat",
        "metric": "t",
        "window": {"kind": "tumbling", "size_s": 10},
        "aggregate": "avg",
        "condition": {"op": ">", "value": 70},
        "event": {"kind": "overheat", "severity": "warning", "message": "machine too hot"},
        "command": {"name": "reset"},
    }
    return RuleSpec.model_validate(base | changes)


def hopping(size_s: float, hop_s: float) -> dict[str, Any]:
    return {"kind": "hopping", "size_s": size_s, "hop_s": hop_s}


def windows(firings: list[Firing]) -> list[tuple[int, int, int]]:
    """(start, end, readings) relative to T0, in seconds for start and end."""
    return [
        ((f.window_start_ms - T0) // S, (f.window_end_ms - T0) // S, f.readings) for f in firings
    ]


# --- membership and boundaries -----------------------------------------------------------


def test_tumbling_windows_are_aligned_and_half_open() -> None:
    rule = Rule(spec(aggregate="count", condition=ALWAYS))
    assert rule.feed(T0 + 3500, 1.0) == []  # the window is [T0, T0 + 10 s), not from 3.5 s
    assert rule.feed(T0 + 10 * S - 1, 1.0) == []  # the last millisecond still belongs to it
    closed = rule.feed(T0 + 10 * S, 1.0)  # the next window's first millisecond closes it
    assert windows(closed) == [(0, 10, 2)]
    assert closed[0].value == 2.0
    assert windows(rule.advance(T0 + 20 * S)) == [(10, 20, 1)]


def test_a_reading_belongs_to_every_hopping_window_containing_it() -> None:
    rule = Rule(spec(window=hopping(10, 5), aggregate="count", condition=ALWAYS))
    rule.feed(T0 + 7 * S, 1.0)  # in [0, 10) and [5, 15)
    rule.feed(T0 + 5 * S, 1.0)  # a window start belongs to it: [0, 10) and [5, 15), not [-5, 5)
    assert rule.open_windows == 2
    firings = rule.advance(T0 + 15 * S)
    assert windows(firings) == [(0, 10, 2), (5, 15, 2)]


def test_hopping_windows_not_dividing_the_size() -> None:
    rule = Rule(spec(window=hopping(10, 4), aggregate="max", condition=ALWAYS))
    rule.feed(T0 + 9 * S, 3.0)  # in [0, 10), [4, 14), [8, 18)
    assert windows(rule.advance(T0 + 18 * S)) == [(0, 10, 1), (4, 14, 1), (8, 18, 1)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 120_000), min_size=1, max_size=40),
    st.sampled_from([(10, 10), (10, 5), (10, 3), (3, 2), (7, 7)]),
    st.data(),
)
def test_firings_match_a_brute_force_count_per_window(
    offsets: list[int], window: tuple[int, int], data: st.DataObject
) -> None:
    size, hop = window
    in_order = data.draw(st.booleans(), label="in order")
    # out of order needs a lateness covering the whole span, so that nothing is late
    lateness = 0 if in_order else 130
    rule = Rule(
        spec(window=hopping(size, hop), aggregate="max", condition=ALWAYS, lateness_s=lateness)
    )
    readings = list(enumerate(sorted(offsets)))  # value i: the i-th reading in time
    if not in_order:
        readings = data.draw(st.permutations(readings), label="arrival order")
    fired: list[Firing] = []
    for i, offset in readings:
        fired += rule.feed(T0 + offset, float(i))
    fired += rule.advance(T0 + 10**7)
    expected = {}
    aligned = (T0 - size * S) // (hop * S) * (hop * S)  # window starts are multiples of hop
    for start in range(aligned, T0 + 130_000, hop * S):
        inside = [i for i, o in enumerate(sorted(offsets)) if start <= T0 + o < start + size * S]
        if inside:
            expected[start] = (len(inside), float(max(inside)))
    assert {f.window_start_ms: (f.readings, f.value) for f in fired} == expected
    assert [f.window_start_ms for f in fired] == sorted(expected)  # closed in time order
    assert rule.late == 0
    assert rule.open_windows == 0


# --- aggregates and conditions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregate", "expected"),
    [("avg", 4.25), ("min", 1.0), ("max", 8.0), ("count", 4.0), ("last", 5.0)],
)
def test_each_aggregate(aggregate: str, expected: float) -> None:
    rule = Rule(spec(aggregate=aggregate, condition=ALWAYS))
    # out of order: the latest by event time (ts +900) arrives second, so `last` is 5
    for offset, value in [(100, 3.0), (900, 5.0), (500, 8.0), (200, 1.0)]:
        rule.feed(T0 + offset, value)
    (firing,) = rule.advance(T0 + 10 * S)
    assert firing.aggregate == aggregate
    assert firing.value == expected
    assert firing.readings == 4


def test_last_of_equal_timestamps_is_the_one_that_arrived_last() -> None:
    rule = Rule(spec(aggregate="last", condition=ALWAYS))
    rule.feed(T0 + 100, 1.0)
    rule.feed(T0 + 100, 2.0)
    assert rule.advance(T0 + 10 * S)[0].value == 2.0


@pytest.mark.parametrize(
    ("condition", "fires"),
    [
        ({"op": ">", "value": 70}, False),
        ({"op": ">", "value": 69.9}, True),
        ({"op": ">=", "value": 70}, True),
        ({"op": ">=", "value": 70.1}, False),
        ({"op": "<", "value": 70}, False),
        ({"op": "<", "value": 70.1}, True),
        ({"op": "<=", "value": 70}, True),
        ({"op": "<=", "value": 69.9}, False),
        ({"op": "between", "low": 60, "high": 70}, True),
        ({"op": "between", "low": 70, "high": 80}, True),
        ({"op": "between", "low": 70.1, "high": 80}, False),
        ({"op": "between", "low": 50, "high": 69.9}, False),
    ],
)
def test_each_condition_at_its_edge(condition: dict[str, Any], fires: bool) -> None:
    rule = Rule(spec(condition=condition))
    rule.feed(T0, 60.0)
    rule.feed(T0 + S, 80.0)  # avg exactly 70
    assert len(rule.advance(T0 + 10 * S)) == int(fires)


# --- consecutive windows -----------------------------------------------------------------


def _feed_windows(rule: Rule, averages: list[float | None]) -> list[tuple[int, int]]:
    """One reading per 10 s window (None: an empty window); (window index, consecutive)."""
    fired: list[Firing] = []
    for i, value in enumerate(averages):
        if value is not None:
            fired += rule.feed(T0 + i * 10 * S + S, value)
    fired += rule.advance(T0 + len(averages) * 10 * S)
    return [((f.window_start_ms - T0) // (10 * S), f.consecutive) for f in fired]


def test_fires_after_n_consecutive_windows_and_the_streak_resets() -> None:
    rule = Rule(spec(for_windows=3))
    averages: list[float | None] = [80, 80, 80, 80, 60, 80, 80, 80]
    assert _feed_windows(rule, averages) == [(2, 3), (3, 4), (7, 3)]
    assert rule.fired == 3


def test_an_empty_window_breaks_the_streak_and_never_fires() -> None:
    rule = Rule(spec(for_windows=2))
    assert _feed_windows(rule, [80, None, 80, 80]) == [(3, 2)]
    assert _feed_windows(Rule(spec(for_windows=1)), [80, None, 80]) == [(0, 1), (2, 1)]


def test_count_is_zero_for_an_empty_window_so_a_silent_sensor_can_fire() -> None:
    rule = Rule(spec(aggregate="count", condition={"op": "<", "value": 1}))
    rule.feed(T0 + S, 20.0)
    assert rule.advance(T0 + 10 * S) == []  # one reading: count 1
    silent = rule.advance(T0 + 20 * S) + rule.advance(T0 + 30 * S)
    assert windows(silent) == [(10, 20, 0), (20, 30, 0)]
    assert [f.value for f in silent] == [0.0, 0.0]
    assert [f.consecutive for f in silent] == [1, 2]


def test_a_long_silence_closed_at_once_fires_only_for_its_last_windows() -> None:
    rule = Rule(spec(aggregate="count", condition={"op": "<", "value": 1}, for_windows=2))
    rule.feed(T0 + S, 20.0)
    firings = rule.advance(T0 + 10_000 * 10 * S)  # e.g. the agent was suspended for a day
    assert windows(firings) == [(99_990, 100_000, 0)]
    assert firings[0].consecutive == 2
    assert rule.open_windows == 0
    # the same silence with advance() every window fires for each window after the second
    stepwise = Rule(spec(aggregate="count", condition={"op": "<", "value": 1}, for_windows=2))
    stepwise.feed(T0 + S, 20.0)
    count = sum(len(stepwise.advance(T0 + k * 10 * S)) for k in range(1, 101))
    assert count == 98


# --- event time: lateness, order, time without readings ----------------------------------


def test_out_of_order_readings_within_the_lateness_count_and_late_ones_are_dropped() -> None:
    rule = Rule(spec(lateness_s=5, aggregate="count", condition=ALWAYS))
    assert rule.feed(T0 + 1 * S, 80.0) == []
    assert rule.feed(T0 + 12 * S, 80.0) == []  # watermark 7 s: [0, 10) stays open
    assert rule.feed(T0 + 9 * S, 80.0) == []  # out of order, still counts
    closed = rule.feed(T0 + 15 * S, 80.0)  # watermark 10 s closes [0, 10)
    assert windows(closed) == [(0, 10, 2)]
    assert rule.feed(T0 + 9500, 80.0) == []  # its window has closed: late
    assert rule.late == 1
    assert windows(rule.advance(T0 + 25 * S)) == [(10, 20, 2)]  # not misassigned to [10, 20)


def test_without_lateness_a_reading_for_a_closed_window_is_late() -> None:
    rule = Rule(spec(aggregate="count", condition=ALWAYS))
    rule.feed(T0 + S, 1.0)
    assert windows(rule.feed(T0 + 10 * S, 1.0)) == [(0, 10, 1)]
    assert rule.feed(T0 + 5 * S, 1.0) == []
    assert rule.late == 1
    rule.feed(T0 + 15 * S, 1.0)
    rule.feed(T0 + 11 * S, 1.0)  # out of order inside the open window: not late
    assert rule.late == 1
    assert windows(rule.advance(T0 + 20 * S)) == [(10, 20, 3)]


def test_a_late_reading_still_joins_its_open_hopping_windows() -> None:
    rule = Rule(spec(window=hopping(10, 5), aggregate="count", condition=ALWAYS))
    rule.feed(T0 + S, 1.0)  # in [-5, 5) and [0, 10)
    assert windows(rule.feed(T0 + 12 * S, 1.0)) == [(-5, 5, 1), (0, 10, 1)]
    rule.feed(T0 + 6 * S, 1.0)  # [0, 10) has closed, [5, 15) has not
    assert rule.late == 1
    assert windows(rule.advance(T0 + 15 * S)) == [(5, 15, 2)]


def test_advance_closes_windows_without_readings_and_respects_lateness() -> None:
    rule = Rule(spec(lateness_s=5))
    assert rule.advance(T0) == []  # time alone: nothing to report yet
    rule.feed(T0 + S, 80.0)
    assert rule.advance(T0 + 10 * S) == []  # the end, but the lateness has not passed
    assert rule.advance(T0 + 15 * S - 1) == []
    firings = rule.advance(T0 + 15 * S)
    assert windows(firings) == [(0, 10, 1)]
    assert rule.watermark_ms == T0 + 10 * S
    assert rule.advance(T0 + 15 * S) == []  # each window closes once
    assert rule.advance(T0) == []  # time never goes back
    assert rule.watermark_ms == T0 + 10 * S


def test_windows_before_the_first_reading_are_not_evaluated() -> None:
    rule = Rule(spec(aggregate="count", condition={"op": "<", "value": 1}))
    assert rule.advance(T0 + 100 * S) == []  # no reading yet: nothing to say about the past
    rule.feed(T0 + 101 * S, 1.0)
    assert windows(rule.advance(T0 + 120 * S)) == [(110, 120, 0)]


def test_a_window_behind_the_first_one_still_closes() -> None:
    rule = Rule(spec(lateness_s=5, aggregate="count", condition=ALWAYS))
    rule.feed(T0 + 12 * S, 1.0)  # the first reading: [10, 20), watermark 7 s
    rule.feed(T0 + 8 * S, 1.0)  # behind it, within the lateness: [0, 10) opens
    assert windows(rule.advance(T0 + 25 * S)) == [(0, 10, 1), (10, 20, 1)]
    assert rule.open_windows == 0


def test_non_finite_and_non_numeric_values_are_ignored() -> None:
    rule = Rule(spec(aggregate="avg", condition=ALWAYS))
    rule.feed(T0 + S, 10.0)
    rule.feed(T0 + 2 * S, math.nan)
    rule.feed(T0 + 3 * S, math.inf)
    rule.feed_metrics(T0 + 4 * S, {"t": "hot"})
    rule.feed_metrics(T0 + 5 * S, {"t": {"v": 30, "u": "degC"}})
    rule.feed_metrics(T0 + 6 * S, {"other": 1})  # not this rule's metric: not counted
    assert rule.ignored == 3
    (firing,) = rule.advance(T0 + 10 * S)
    assert (firing.value, firing.readings) == (20.0, 2)


def test_metric_values_of_every_telemetry_form() -> None:
    assert metric_value({"t": 21.5}, "t") == 21.5
    assert metric_value({"t": 3}, "t") == 3.0
    assert metric_value({"t": True}, "t") == 1.0
    assert metric_value({"t": {"v": 21.5, "u": "degC"}}, "t") == 21.5
    assert metric_value({"t": Quantity(7, "A")}, "t") == 7.0
    assert metric_value({"t": "on"}, "t") is None
    assert metric_value({"t": math.nan}, "t") is None
    assert metric_value({}, "t") is None


def test_a_message_without_the_metric_still_moves_event_time() -> None:
    rule = Rule(spec(condition=ALWAYS))
    rule.feed_metrics(T0 + S, {"t": 50})
    assert windows(rule.feed_metrics(T0 + 10 * S, {"humidity": 40})) == [(0, 10, 1)]


def test_only_open_windows_are_kept() -> None:
    rule = Rule(spec(window=hopping(60, 10), lateness_s=5, condition=ALWAYS))
    most = 0
    for k in range(20_000):
        rule.feed(T0 + k * 250, 1.0)
        most = max(most, rule.open_windows)
    assert most <= (60 + 5) // 10 + 1


# --- what a firing sends -----------------------------------------------------------------


def test_the_event_body_is_a_valid_design_event() -> None:
    rule = Rule(spec(window={"kind": "tumbling", "size_s": 30}, for_windows=2))
    rule.feed(T0 + S, 72.0)
    rule.feed(T0 + 31 * S, 74.0)
    rule.feed(T0 + 32 * S, 76.0)
    (firing,) = rule.advance(T0 + 60 * S)
    body = firing.event_body()
    assert body == {
        "ts": T0 + 60 * S,
        "kind": "overheat",
        "severity": "warning",
        "message": "machine too hot",
        "data": {
            "rule": "overheat",
            "metric": "t",
            "window_start": T0 + 30 * S,
            "window_end": T0 + 60 * S,
            "aggregate": "avg",
            "value": 75.0,
            "readings": 2,
            "consecutive": 2,
        },
    }
    event = Event.model_validate(body)
    assert event.severity is Severity.WARNING
    now = datetime.fromtimestamp((T0 + 61 * S) / 1000, UTC)
    decoded = decode_event(json.dumps(body).encode(), now=now)
    assert decoded.ts == datetime.fromtimestamp((T0 + 60 * S) / 1000, UTC)
    assert decoded.data["window_start"] == T0 + 30 * S


def test_without_a_message_the_event_describes_the_firing() -> None:
    rule = Rule(spec(event={"kind": "overheat"}, aggregate="max"))
    rule.feed(T0 + S, 71.25)
    body = rule.advance(T0 + 10 * S)[0].event_body()
    assert body["message"] == "max t 71.25 > 70 (1 window)"
    assert Event.model_validate(body).kind == "overheat"


def test_command_body_and_missing_actions() -> None:
    rule = Rule(spec(command={"name": "set-interval", "args": {"interval_s": 5}}, event=None))
    rule.feed(T0 + S, 80.0)
    (firing,) = rule.advance(T0 + 10 * S)
    name, args = firing.command_body()
    assert (name, args) == ("set-interval", {"interval_s": 5})
    args["interval_s"] = 99  # each body is a fresh copy
    assert firing.command_body()[1] == {"interval_s": 5}
    with pytest.raises(RuleError, match="no event"):
        firing.event_body()
    silent = Rule(spec(command=None))
    silent.feed(T0 + S, 80.0)
    with pytest.raises(RuleError, match="no command"):
        silent.advance(T0 + 10 * S)[0].command_body()


def test_the_engine_feeds_rules_by_name_and_advances_them_all() -> None:
    engine = RuleEngine([spec(), spec(name="cold", condition={"op": "<", "value": 10})])
    assert engine.feed("overheat", T0 + S, {"t": 80}) == []
    assert engine.feed("cold", T0 + S, {"t": 5}) == []
    fired = engine.advance(T0 + 10 * S)
    assert [f.rule for f in fired] == ["overheat", "cold"]
    with pytest.raises(KeyError):
        engine.feed("absent", T0, {"t": 1})
