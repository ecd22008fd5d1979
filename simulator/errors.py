"""Errors of the simulator: each message says what was wrong and what to do."""


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


class LinkError(SimulatorError):
    """A device's MQTT connection failed or was refused; the message says by whom and why."""


class CommandError(SimulatorError):
    """A command a device cannot carry out; `status` is the result it answers with."""

    def __init__(self, status: str, detail: str) -> None:
        self.status = status
        self.detail = detail
        self.command_id: str | None = None  # set when refused before it ran
        super().__init__(detail)


class UnknownSensorError(SimulatorError):
    """No sensor with that handle (it was never added, or was removed)."""
