"""The commands only simulated devices take: `sensor-add` and `sensor-remove`.

`reset` and `set-interval` are every device's (`device_runtime.args`); these two start and
stop simulated sensors, so they live with the sensor models. `sensor-add` takes the source
platform's sensor body; `sensor-remove` takes `{"id": "t2"}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field

from device_runtime import args as runtime_args
from device_runtime.args import MAX_INTERVAL_S, MIN_INTERVAL_S, Args, ResetArgs, SetInterval

SENSOR_TYPES = ("temperature", "humidity")

SensorId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]


class SensorAdd(Args):
    """`sensor-add`: a sensor of a default model, its sampling interval, offset and disturbances."""

    id: SensorId = Field(description="The metric name it reports under.")
    type: Literal["temperature", "humidity"] = Field(description="Which default model it follows.")
    interval_s: float | None = Field(
        default=None,
        ge=MIN_INTERVAL_S,
        le=MAX_INTERVAL_S,
        allow_inf_nan=False,
        description="Its sampling interval; absent: every telemetry message.",
    )
    offset: float = Field(default=0.0, allow_inf_nan=False, description="Added to every value.")
    disturbances: list[dict[str, Any]] = Field(
        default_factory=list, max_length=16, description="Perturbations and faults, in order."
    )


class SensorRemove(Args):
    """`sensor-remove`: the id given to `sensor-add`."""

    id: SensorId


ARGUMENTS: Mapping[str, type[Args]] = {
    **runtime_args.ARGUMENTS,
    "sensor-add": SensorAdd,
    "sensor-remove": SensorRemove,
}
"""The commands a simulated device knows, by name."""

CommandArgs = ResetArgs | SetInterval | SensorAdd | SensorRemove


def parse_args(name: str, args: dict[str, Any]) -> CommandArgs:
    """The validated arguments of command `name` for a simulated device; CommandError if not."""
    return runtime_args.parse_args(name, args, ARGUMENTS)  # type: ignore[return-value]
