"""The agent's modules: simulated sensors and machines from `simulator/`, one source each.

A module samples on its own interval and hands the agent `{"ts", "metrics"}`; its metric
names are its own (`machine_temperature`); upstream they travel as `<module>.<metric>`,
so two modules never collide on the agent's single telemetry topic.
"""

from __future__ import annotations

import time
from typing import Any

from schemas.messages import CommandStatus
from simulator.commands import SensorAdd, SensorRemove, SetInterval, parse_args
from simulator.errors import CommandError
from simulator.sources import ArmaSource, SensorBank, make_source


class SimModule:
    """A simulated device inside the gateway: arma, pico or machine."""

    def __init__(
        self, name: str, kind: str, bank: SensorBank, *, interval_s: float, sensors: int = 2
    ) -> None:
        self.name = name
        self.kind = kind
        self.interval_s = interval_s
        self.source: ArmaSource = make_source(kind, bank, sensors, interval_s=interval_s)
        self.next_due = 0.0
        self._last_ts = 0
        self.resets = 0

    def due(self, now: float) -> bool:
        """True when a sample is due at monotonic time `now` (and schedules the next)."""
        if now < self.next_due:
            return False
        self.next_due = max(self.next_due + self.interval_s, now) if self.next_due else now
        return True

    def sample(self, now_wall: float) -> dict[str, Any] | None:
        """The next reading as `{"ts", "metrics"}`, or None when no sensor had a value."""
        metrics = self.source.metrics(now_wall)
        if not metrics:
            return None
        # strictly increasing ms: the database keeps one value per metric and millisecond
        ts = max(int(now_wall * 1000), self._last_ts + 1)
        self._last_ts = ts
        return {"ts": ts, "metrics": metrics}

    def command(self, name: str, args: dict[str, Any]) -> str:
        """Carry out a command; the detail of an `ok` result, CommandError otherwise."""
        parsed = parse_args(name, args)
        if name == "reset":
            self.source.reset()
            self.resets += 1
            return f"{self.name}: reset"
        if isinstance(parsed, SetInterval):
            old, self.interval_s = self.interval_s, parsed.interval_s
            self.next_due = time.monotonic()
            return f"{self.name}: interval {old:g} s -> {self.interval_s:g} s"
        if isinstance(parsed, SensorAdd):
            self.source.add_sensor(parsed)
            return f"{self.name}: sensor {parsed.id!r} added"
        if isinstance(parsed, SensorRemove):
            self.source.remove_sensor(parsed.id)
            return f"{self.name}: sensor {parsed.id!r} removed"
        raise CommandError(CommandStatus.REJECTED, f"{self.name} does not take {name!r}")
