"""What each kind of simulated device reads: ARMA sensors, a Pico W thermistor, a machine.

All ARMA sensors of a fleet live in one `SensorBank` (one vectorised `Engine`); a device's
source holds the handles of its own sensors and turns the bank's latest values into the
`metrics` object of its next telemetry message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from device_runtime.errors import CommandError
from schemas.messages import CommandStatus
from simulator.arma import ArmaModel, default_model
from simulator.commands import SensorAdd
from simulator.engine import Engine
from simulator.errors import SensorFaultError
from simulator.machine import Machine
from simulator.perturbations import Disturbance, parse_disturbances
from simulator.thermistor import Thermistor

DECIMALS = 6  # the engine rounds to each sensor's resolution; this only trims float noise


class SensorBank:
    """Every ARMA sensor of a fleet, stepped together once per model tick."""

    def __init__(self, seed: int | None = None) -> None:
        self.engine = Engine(seed)
        self.rng = self.engine.rng
        self._values: list[float] = []
        self._models: dict[str, ArmaModel] = {}

    def model(self, name: str) -> ArmaModel:
        """A shipped default model, loaded once per fleet."""
        if name not in self._models:
            self._models[name] = default_model(name)
        return self._models[name]

    def add(
        self,
        model: ArmaModel,
        *,
        offset: float = 0.0,
        disturbances: list[Disturbance] | None = None,
        interval_s: float = 1.0,
    ) -> int:
        """A new sensor; its handle. It has a value from the next `step()` on."""
        handle = self.engine.add(
            model, offset=offset, disturbances=disturbances or (), interval_s=interval_s
        )
        if handle < len(self._values):
            self._values[handle] = math.nan  # a reused slot: not the removed sensor's value
        return handle

    def remove(self, handle: int) -> None:
        self.engine.remove(handle)

    def step(self) -> None:
        """Advance every sensor one tick (disturbances, quantisation and bounds applied)."""
        self._values = self.engine.step().tolist()

    def value(self, handle: int) -> float | None:
        """The sensor's latest value; None before its first tick or while it drops out."""
        if handle >= len(self._values):
            return None
        v = self._values[handle]
        return None if math.isnan(v) else round(v, DECIMALS)


@dataclass
class Sensor:
    """One ARMA sensor of a device: the metric it reports under and when it is due."""

    id: str
    type: str
    handle: int
    unit: str | None
    offset: float = 0.0
    interval_s: float | None = None
    disturbances: tuple[Disturbance, ...] = ()
    next_due: float = 0.0

    def due(self, now: float) -> bool:
        if self.interval_s is None:
            return True
        if now + 1e-6 < self.next_due:
            return False
        self.next_due = max(self.next_due + self.interval_s, now)
        return True


class ArmaSource:
    """A device whose readings are ARMA sensors (the default models) in the fleet's bank."""

    def __init__(self, bank: SensorBank, sensors: int = 2, *, interval_s: float = 1.0) -> None:
        self.bank = bank
        self.interval_s = interval_s
        self.sensors: dict[str, Sensor] = {}
        for i in range(sensors):
            kind = ("temperature", "humidity")[i % 2]
            name = kind if i < 2 else f"{kind}_{i // 2 + 1}"
            self._add(name, kind)

    def _add(
        self,
        sensor_id: str,
        kind: str,
        *,
        offset: float = 0.0,
        interval_s: float | None = None,
        disturbances: tuple[Disturbance, ...] = (),
    ) -> Sensor:
        model = self.bank.model(kind)
        handle = self.bank.add(
            model,
            offset=offset,
            disturbances=list(disturbances),
            interval_s=interval_s or self.interval_s,
        )
        sensor = Sensor(sensor_id, kind, handle, model.unit, offset, interval_s, disturbances)
        self.sensors[sensor_id] = sensor
        return sensor

    def metrics(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sensor in self.sensors.values():
            if not sensor.due(now):
                continue
            value = self.bank.value(sensor.handle)
            if value is None:  # a dropout: no sample, as a real sensor that did not answer
                continue
            out[sensor.id] = {"v": value, "u": sensor.unit} if sensor.unit else value
        return out

    def reset(self) -> None:
        # a rebooted device's sensors start afresh from the models' stationary state
        for sensor in list(self.sensors.values()):
            self.bank.remove(sensor.handle)
            del self.sensors[sensor.id]
            self._add(
                sensor.id,
                sensor.type,
                offset=sensor.offset,
                interval_s=sensor.interval_s,
                disturbances=sensor.disturbances,
            )

    def add_sensor(self, spec: SensorAdd) -> None:
        if spec.id in self.sensors or spec.id in self.reserved:
            raise CommandError(CommandStatus.ERROR, f"sensor {spec.id!r} exists already")
        disturbances = tuple(parse_disturbances(spec.disturbances))
        self._add(
            spec.id,
            spec.type,
            offset=spec.offset,
            interval_s=spec.interval_s,
            disturbances=disturbances,
        )

    def remove_sensor(self, sensor_id: str) -> None:
        sensor = self.sensors.pop(sensor_id, None)
        if sensor is None:
            have = ", ".join(sorted(self.sensors)) or "none"
            raise CommandError(
                CommandStatus.ERROR, f"no sensor {sensor_id!r} on this device (sensors: {have})"
            )
        self.bank.remove(sensor.handle)

    @property
    def reserved(self) -> frozenset[str]:
        """Metric names the device's own hardware reports (not removable, not reusable)."""
        return frozenset()


class PicoSource(ArmaSource):
    """A Pico W with a 10k NTC on GP26: the room temperature follows the default temperature
    model; the device reports the `read_u16` count and the temperature it converts it to."""

    def __init__(self, bank: SensorBank, *, interval_s: float = 1.0) -> None:
        super().__init__(bank, 0, interval_s=interval_s)
        self.thermistor = Thermistor()
        self._room = bank.add(bank.model("temperature"), interval_s=interval_s)

    @property
    def reserved(self) -> frozenset[str]:
        return frozenset({"adc_raw", "temperature", "thermistor_fault"})

    def metrics(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        room = self.bank.value(self._room)
        if room is not None:
            count = self.thermistor.read_u16(room, self.bank.rng)
            out["adc_raw"] = count
            try:
                celsius = self.thermistor.to_celsius(count)
            except SensorFaultError as exc:
                # as the firmware reports it: a fault, never a temperature
                out["thermistor_fault"] = exc.fault
            else:
                out["temperature"] = {"v": round(celsius, 2), "u": "degC"}
        out.update(super().metrics(now))
        return out

    def reset(self) -> None:
        self.bank.remove(self._room)
        self._room = self.bank.add(self.bank.model("temperature"), interval_s=self.interval_s)
        super().reset()


class MachineSource(ArmaSource):
    """The machine of Azure IoT Edge's SimulatedTemperatureSensor; `reset` cools it down."""

    def __init__(self, bank: SensorBank, *, interval_s: float = 1.0) -> None:
        super().__init__(bank, 0, interval_s=interval_s)
        self.machine = Machine(bank.rng)

    @property
    def reserved(self) -> frozenset[str]:
        return frozenset(self.machine.metrics())

    def metrics(self, now: float) -> dict[str, Any]:
        self.machine.step()  # one machine tick per telemetry message, as the source does
        out = self.machine.metrics()
        out.update(super().metrics(now))
        return out

    def reset(self) -> None:
        self.machine.reset()
        super().reset()


def make_source(
    kind: str, bank: SensorBank, sensors: int, *, interval_s: float = 1.0
) -> ArmaSource:
    """The source of a device of `kind` (arma, pico or machine); `sensors` counts for arma."""
    if kind == "pico":
        return PicoSource(bank, interval_s=interval_s)
    if kind == "machine":
        return MachineSource(bank, interval_s=interval_s)
    return ArmaSource(bank, sensors, interval_s=interval_s)
