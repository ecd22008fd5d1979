"""A machine that heats up until reset, like Azure IoT Edge's SimulatedTemperatureSensor.

Each tick, while the machine temperature is at most `max_temp` it rises by
-0.25 + 1.5 U[0, 1) (+0.5 on average, from `min_temp` = 21); above `max_temp` it wanders by
U[0, 1) - 0.5. Pressure follows the temperature linearly, from 1 at `min_temp` to 10 at
`max_temp`: 1 + (T - 21) * 9 / 79. Ambient temperature is 21 + U[0, 1) - 0.5 and ambient
humidity an integer of 24, 25 or 26 %RH, drawn afresh each tick. `reset()` (the `reset`
command) returns the machine temperature to `min_temp`; the next tick rises from there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simulator.errors import ModelError


class Machine:
    """One simulated machine; `step()` once per telemetry interval, then `metrics()`."""

    def __init__(
        self,
        seed: int | np.random.SeedSequence | np.random.Generator | None = None,
        *,
        min_temp: float = 21.0,
        max_temp: float = 100.0,
        min_pressure: float = 1.0,
        max_pressure: float = 10.0,
        ambient_temp: float = 21.0,
    ) -> None:
        if not max_temp > min_temp:
            raise ModelError(f"max_temp ({max_temp}) must be above min_temp ({min_temp})")
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.min_temp, self.max_temp = min_temp, max_temp
        self.min_pressure, self.max_pressure = min_pressure, max_pressure
        self.ambient_temp = ambient_temp
        self.temperature = min_temp
        self.ambient_temperature = ambient_temp
        self.ambient_humidity = 25
        self.ticks = 0
        self.resets = 0

    @property
    def pressure(self) -> float:
        """Machine pressure, linear in its temperature."""
        slope = (self.max_pressure - self.min_pressure) / (self.max_temp - self.min_temp)
        return self.min_pressure + (self.temperature - self.min_temp) * slope

    def step(self) -> None:
        """Advance one tick (the temperature moves; ambient values are drawn anew)."""
        u = float(self.rng.random())
        if self.temperature > self.max_temp:
            self.temperature += u - 0.5
        else:
            self.temperature += -0.25 + 1.5 * u
        self.ambient_temperature = self.ambient_temp + float(self.rng.random()) - 0.5
        self.ambient_humidity = int(self.rng.integers(24, 27))
        self.ticks += 1

    def reset(self) -> None:
        """Cool the machine down to its minimum temperature (the `reset` command)."""
        self.temperature = self.min_temp
        self.resets += 1

    def metrics(self, *, units: bool = True) -> dict[str, Any]:
        """The telemetry `metrics` object (flat names; `{"v", "u"}` values when `units`)."""
        # the source gives pressure no unit, so it stays a bare number
        values: dict[str, tuple[float | int, str | None]] = {
            "machine_temperature": (round(self.temperature, 3), "degC"),
            "machine_pressure": (round(self.pressure, 4), None),
            "ambient_temperature": (round(self.ambient_temperature, 3), "degC"),
            "ambient_humidity": (self.ambient_humidity, "%RH"),
        }
        return {name: {"v": v, "u": u} if units and u else v for name, (v, u) in values.items()}
