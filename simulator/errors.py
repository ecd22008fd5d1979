"""Errors of the simulator: each message says what was wrong and what to do.

A device's link and command errors are the device runtime's (`device_runtime.errors`).
"""


class SimulatorError(Exception):
    """Base: a simulator model, fit, disturbance or device operation failed."""


class ModelError(SimulatorError):
    """A sensor model cannot be fitted, loaded, saved or used as given."""


class DisturbanceError(SimulatorError):
    """A disturbance spec (sensor-add `disturbances`) is invalid; the message names the item."""


class SensorFaultError(SimulatorError):
    """A reading is a fault code (open or short circuit), not a measurement."""

    def __init__(self, fault: str, count: int, detail: str) -> None:
        self.fault = fault
        self.count = count
        super().__init__(f"{fault} circuit: reading {count} {detail}")


class UnknownSensorError(SimulatorError):
    """No sensor with that handle (it was never added, or was removed)."""
