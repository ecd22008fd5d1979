"""Windowed rules over event time: the edge agent's local stream analytics.

Each `Rule` aggregates one metric (avg, min, max, count or last) over windows of the
readings' own timestamps (`ts`, epoch milliseconds), and fires when a window closes and its
condition has held for `for_windows` consecutive windows; every further such window fires
again, with a growing `consecutive`.

- Alignment: tumbling windows are [k*size, (k+1)*size) since the epoch; hopping windows are
  [k*hop, k*hop + size), and a reading belongs to every window containing it.
- Closing: the watermark is the latest time seen minus `lateness_s`; a window closes (once)
  when the watermark reaches its end. Times come from readings (`feed`) and from
  `advance(now_ms)`, which the runtime calls with wall-clock time so a silent sensor still
  closes its windows. Readings out of order within the lateness land in their windows.
- Late readings: a reading for a window that has already closed is not added to it (closed
  windows never reopen); it still joins its windows that are open (hopping). `late` counts
  the readings that missed a window. Non-finite and non-numeric values are ignored
  (`ignored`); booleans count as 1 and 0, as in storage.
- Empty windows: from the first reading's window on, every window closes in turn, empty or
  not (before the first reading there is nothing to evaluate). An empty window has no
  avg/min/max/last, so it cannot fire and it breaks the streak: a silent sensor is not
  evidence of a hot machine, and "3 windows in a row" means 3 windows of time. Its count
  is 0, so `count < 1` detects a sensor that has gone silent.
- A long silence closed at once (the agent suspended, a clock jump) is evaluated only for its
  last `for_windows` windows, so a rule never fires a flood about the past.
- Memory: only open windows that have readings are kept, at most (size + lateness)/hop + 1.
  A reading far in the future moves the watermark with it: the runtime should refuse
  timestamps beyond the platform's future skew before feeding them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_agent.errors import RuleError
from edge_agent.manifest import RuleSpec
from schemas.messages import Quantity


@dataclass(frozen=True, slots=True)
class Firing:
    """A closed window whose condition held `consecutive` windows in a row."""

    rule: str
    window_start_ms: int
    window_end_ms: int
    aggregate: str
    value: float
    readings: int
    consecutive: int
    spec: RuleSpec = field(repr=False, compare=False)

    def describe(self) -> str:
        """`avg machine_temperature 72.4 > 70 (2 windows in a row)`, the default message."""
        windows = "window" if self.consecutive == 1 else "windows in a row"
        return (
            f"{self.aggregate} {self.spec.metric} {self.value:.6g} "
            f"{self.spec.condition.describe()} ({self.consecutive} {windows})"
        )

    def event_body(self) -> dict[str, Any]:
        """The DESIGN Event payload for the agent's `events` topic (schemas.messages.Event)."""
        event = self.spec.event
        if event is None:
            raise RuleError(f"rule {self.rule!r} has no event: add event = {{ kind = ... }}")
        return {
            "ts": self.window_end_ms,
            "kind": event.kind,
            "severity": event.severity.value,
            "message": event.message or self.describe(),
            "data": {
                "rule": self.rule,
                "metric": self.spec.metric,
                "window_start": self.window_start_ms,
                "window_end": self.window_end_ms,
                "aggregate": self.aggregate,
                "value": self.value,
                "readings": self.readings,
                "consecutive": self.consecutive,
            },
        }

    def command_body(self) -> tuple[str, dict[str, Any]]:
        """The rule's command as (name, args), the args a fresh copy each time."""
        command = self.spec.command
        if command is None:
            raise RuleError(f"rule {self.rule!r} has no command: add command = {{ name = ... }}")
        return command.name, copy.deepcopy(command.args)


class _Window:
    """The running aggregates of one open window."""

    __slots__ = ("count", "high", "last", "last_ts", "low", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.last_ts = -math.inf
        self.last = math.nan

    def add(self, ts: int, value: float) -> None:
        self.count += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        # `last` is by event time; of equal timestamps, the one that arrived last
        if ts >= self.last_ts:
            self.last_ts, self.last = ts, value

    def value(self, aggregate: str) -> float:
        if aggregate == "avg":
            return self.total / self.count
        if aggregate == "count":
            return float(self.count)
        return {"min": self.low, "max": self.high, "last": self.last}[aggregate]


def metric_value(metrics: Mapping[str, Any], name: str) -> float | None:
    """The number of metric `name` in a telemetry `metrics` object, or None if it has none."""
    value = metrics.get(name)
    if isinstance(value, Quantity):
        value = value.v
    elif isinstance(value, Mapping):
        value = value.get("v")
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


class Rule:
    """One rule's windows, watermark and streak; feed it readings, advance it with time."""

    def __init__(self, spec: RuleSpec) -> None:
        self.spec = spec
        self.size_ms = spec.window.size_ms
        self.hop_ms = spec.window.hop_ms
        self.lateness_ms = spec.lateness_ms
        self.watermark_ms: int | None = None
        self.streak = 0  # consecutive closed windows whose condition held
        self.late = 0  # readings that missed an already closed window
        self.ignored = 0  # readings without a finite number
        self.fired = 0
        self._open: dict[int, _Window] = {}  # window start -> aggregates
        self._next_start: int | None = None  # the earliest window not yet closed

    @property
    def name(self) -> str:
        """The rule's name (routes call it `rules/<name>`)."""
        return self.spec.name

    @property
    def open_windows(self) -> int:
        """How many windows hold readings and have not closed yet."""
        return len(self._open)

    def feed(self, ts_ms: int, value: float) -> list[Firing]:
        """Add one reading at event time `ts_ms`; the firings of the windows it closes."""
        if not math.isfinite(value):
            self.ignored += 1
            return self._move(ts_ms - self.lateness_ms)
        watermark = self.watermark_ms
        missed = False
        start = self._first_start(ts_ms)
        while start <= ts_ms:
            if watermark is not None and start + self.size_ms <= watermark:
                missed = True  # that window has closed: never reopen or misassign
            else:
                window = self._open.get(start)
                if window is None:
                    window = self._open[start] = _Window()
                    # the timeline starts at the earliest window with a reading; one opened
                    # behind it (out of order, within the lateness) has not been passed yet
                    if self._next_start is None or start < self._next_start:
                        self._next_start = start
                window.add(ts_ms, value)
            start += self.hop_ms
        self.late += missed
        return self._move(ts_ms - self.lateness_ms)

    def feed_metrics(self, ts_ms: int, metrics: Mapping[str, Any]) -> list[Firing]:
        """Feed the rule's metric from a telemetry `metrics` object (its time counts anyway)."""
        value = metric_value(metrics, self.spec.metric)
        if value is None:
            self.ignored += self.spec.metric in metrics
            return self._move(ts_ms - self.lateness_ms)
        return self.feed(ts_ms, value)

    def advance(self, now_ms: int) -> list[Firing]:
        """Let time pass without a reading (wall clock): close the windows it ends."""
        return self._move(now_ms - self.lateness_ms)

    def _first_start(self, t: int) -> int:
        """The earliest aligned window start whose window contains time `t`."""
        return ((t - self.size_ms) // self.hop_ms + 1) * self.hop_ms

    def _move(self, watermark: int) -> list[Firing]:
        if self.watermark_ms is not None and watermark <= self.watermark_ms:
            return []
        self.watermark_ms = watermark
        if self._next_start is None:
            return []  # no reading yet: no window to evaluate
        limit = self._first_start(watermark)  # windows starting before it have ended
        start = self._next_start
        firings: list[Firing] = []
        while start < limit:
            window = self._open.pop(start, None)
            if window is None:
                gap = (min(min(self._open, default=limit), limit) - start) // self.hop_ms
                if gap > self.spec.for_windows:
                    # a long silence: only its last for_windows windows can matter
                    start += (gap - self.spec.for_windows) * self.hop_ms
                    self.streak = 0
            firing = self._close(start, window)
            if firing is not None:
                firings.append(firing)
            start += self.hop_ms
        self._next_start = start
        return firings

    def _close(self, start: int, window: _Window | None) -> Firing | None:
        aggregate = self.spec.aggregate
        if window is None:
            value: float | None = 0.0 if aggregate == "count" else None
        else:
            value = window.value(aggregate)
        if value is None or not self.spec.condition.holds(value):
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < self.spec.for_windows:
            return None
        self.fired += 1
        return Firing(
            rule=self.spec.name,
            window_start_ms=start,
            window_end_ms=start + self.size_ms,
            aggregate=aggregate,
            value=value,
            readings=0 if window is None else window.count,
            consecutive=self.streak,
            spec=self.spec,
        )


class RuleEngine:
    """Every rule of a manifest by name; the runtime feeds it what routes send to rules."""

    def __init__(self, specs: Iterable[RuleSpec]) -> None:
        self.rules: dict[str, Rule] = {spec.name: Rule(spec) for spec in specs}

    def feed(self, rule: str, ts_ms: int, metrics: Mapping[str, Any]) -> list[Firing]:
        """Feed a telemetry message's metrics to rule `rule` (its name, without `rules/`)."""
        return self.rules[rule].feed_metrics(ts_ms, metrics)

    def advance(self, now_ms: int) -> list[Firing]:
        """Let wall-clock time pass for every rule; their firings in rule order."""
        return [firing for rule in self.rules.values() for firing in rule.advance(now_ms)]
