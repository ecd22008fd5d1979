"""The agent's simulated modules: sensors and machines from `simulator/`, one source each.

A module samples on its own interval and hands the agent `{"ts", "metrics"}`; its metric
names are its own (`machine_temperature`); upstream they travel as `<module>.<metric>`,
so two modules never collide on the agent's single telemetry topic.

The simulator (and its numerical stack) is imported here only when a manifest has a
simulated module: a gateway with real sources runs without it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from device_runtime.args import SetInterval
from device_runtime.errors import CommandError
from schemas.messages import CommandStatus

if TYPE_CHECKING:
    from edge_agent.manifest import ModuleSpec
    from simulator.sources import ArmaSource, SensorBank


def sim_modules(specs: Iterable[ModuleSpec]) -> dict[str, SimModule]:
    """The simulated modules among `specs`, by name, sharing one sensor bank."""
    simulated = [m for m in specs if m.simulated]
    if not simulated:
        return {}
    from simulator.sources import SensorBank  # only for the sim kinds

    bank = SensorBank(seed=None)
    return {
        m.name: SimModule(m.name, m.kind, bank, interval_s=m.interval_s, sensors=m.sensors)
        for m in simulated
    }


class SimModule:
    """A simulated device inside the gateway: arma, pico or machine."""

    def __init__(
        self, name: str, kind: str, bank: SensorBank, *, interval_s: float, sensors: int = 2
    ) -> None:
        from simulator.sources import make_source  # only for the sim kinds

        self.name = name
        self.kind = kind
        self.bank = bank
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
        self.bank.step()  # one model step per sample: cheap, and keeps modules apart
        metrics = self.source.metrics(now_wall)
        if not metrics:
            return None
        # strictly increasing ms: the database keeps one value per metric and millisecond
        ts = max(int(now_wall * 1000), self._last_ts + 1)
        self._last_ts = ts
        return {"ts": ts, "metrics": metrics}

    def command(self, name: str, args: dict[str, Any]) -> str:
        """Carry out a command; the detail of an `ok` result, CommandError otherwise."""
        from simulator.errors import SimulatorError  # only for the sim kinds

        try:
            return self._command(name, args)
        except SimulatorError as exc:  # a model or disturbance the simulator refused
            raise CommandError(CommandStatus.ERROR, str(exc)) from exc

    def _command(self, name: str, args: dict[str, Any]) -> str:
        from simulator.commands import SensorAdd, SensorRemove, parse_args

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
