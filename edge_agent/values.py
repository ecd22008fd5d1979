"""Field readings checked against the platform's rules before they enter the outbox.

The outbox merges the samples of every module into one telemetry message, and ingest refuses
a whole message for one invalid metric or ts: so one bad value from a field server (a padded
PLC string, a text longer than 256 characters, a float beyond 1e300, a SourceTimestamp of
DateTime 0 or a PLC clock running ahead) would dead-letter everybody's values. Here each
metric is checked on its own (schemas.messages.metric_problem) and only the bad one is
dropped; a ts ingest would refuse is replaced by the agent's receive time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edge_agent.throttle import EventThrottle
from schemas.limits import DEFAULT_LIMITS, Limits
from schemas.messages import metric_problem

Tell = Callable[[str, str, str, dict[str, Any]], None]
"""(module, kind, message, data): a warning event for the agent's `events` topic."""
Count = Callable[[str, str], None]
"""(module, reason): one metric dropped or one ts replaced, for a Prometheus counter."""


def _strip(value: Any) -> Any:
    # PLC strings are fixed-length buffers padded with NULs, which storage cannot hold
    if isinstance(value, str):
        return value.rstrip("\x00")
    if isinstance(value, dict) and isinstance(value.get("v"), str):
        return {**value, "v": value["v"].rstrip("\x00")}
    return value


def _reason(name: str, value: Any) -> str:
    """A short label for what is wrong: name, text, number or type."""
    if metric_problem(name, 0) is not None:
        return "name"
    scalar = value.get("v") if isinstance(value, dict) else value
    if isinstance(scalar, str):
        return "text"
    if isinstance(scalar, int | float) and not isinstance(scalar, bool):
        return "number"
    return "type"


class ValueGuard:
    """Cleans one module's reading: drops invalid metrics, re-times an unusable ts."""

    def __init__(
        self,
        tell: Tell,
        count: Count,
        *,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tell_event = tell
        self._count = count
        self._earliest_ms = int(limits.min_timestamp.timestamp() * 1000)
        skew = limits.max_future_skew
        self._skew_ms = None if skew is None else int(skew.total_seconds() * 1000)
        self._clock = clock
        self._told = EventThrottle(monotonic)  # one event per (module, metric, reason) a minute

    def clean(self, module: str, reading: dict[str, Any]) -> dict[str, Any] | None:
        """The reading with its bad metrics left out and a usable ts; None when nothing is left.

        `reading` is `{"ts", "metrics"}` with the module's own metric names; the names are
        checked as they travel upstream, `<module>.<metric>`."""
        now_ms = int(self._clock() * 1000)
        metrics: dict[str, Any] = {}
        for name, raw in reading.get("metrics", {}).items():
            value = _strip(raw)
            problem = metric_problem(f"{module}.{name}", value)
            if problem is None:
                metrics[name] = value
                continue
            reason = _reason(f"{module}.{name}", value)
            self._count(module, reason)
            self._tell(
                module, name, reason, "field_value_dropped",
                f"{module}.{name}: {problem}; this value is dropped, the module's other "
                "metrics are kept",
            )  # fmt: skip
        if not metrics:
            return None
        ts = reading.get("ts")
        why = self._ts_problem(ts, now_ms)
        if why is not None:
            self._count(module, "ts")
            self._tell(
                module, "ts", "ts", "field_ts_replaced",
                f"{module}: the source timestamp {ts!r} {why}; the agent's receive time is "
                "used instead",
            )  # fmt: skip
            ts = now_ms
        return {"ts": ts, "metrics": metrics}

    def _ts_problem(self, ts: object, now_ms: int) -> str | None:
        if isinstance(ts, bool) or not isinstance(ts, int | float) or ts != ts:
            return "is not epoch milliseconds"
        if ts < self._earliest_ms:
            return "is before 2000 (a clock never set, or DateTime 0)"
        if ts == float("inf") or (self._skew_ms is not None and ts > now_ms + self._skew_ms):
            return f"is {(ts - now_ms) / 1000:.0f} s ahead of the agent's clock"
        return None

    def _tell(self, module: str, metric: str, reason: str, kind: str, message: str) -> None:
        since = self._told.due((module, metric, reason))
        if since is None:
            return
        data: dict[str, Any] = {"metric": metric, "reason": reason, "suppressed": since}
        self._tell_event(module, kind, message[:900], data)
