"""The arguments of the commands a simulated device understands, validated before anything runs.

`reset` takes none; `set-interval` takes `{"interval_s": 2.5}`; `sensor-add` takes the source
platform's sensor body; `sensor-remove` takes `{"id": "t2"}`. A body that does not validate
becomes an `error` result naming the field; an unknown command is `rejected`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.messages import Command, CommandStatus
from simulator.errors import CommandError, SimulatorError

MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 86_400.0
SENSOR_TYPES = ("temperature", "humidity")

SensorId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class ResetArgs(_Args):
    """`reset`: no arguments."""


class SetInterval(_Args):
    """`set-interval`: the seconds between telemetry messages."""

    interval_s: float = Field(ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S, allow_inf_nan=False)


class SensorAdd(_Args):
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


class SensorRemove(_Args):
    """`sensor-remove`: the id given to `sensor-add`."""

    id: SensorId


ARGUMENTS: dict[str, type[_Args]] = {
    "reset": ResetArgs,
    "set-interval": SetInterval,
    "sensor-add": SensorAdd,
    "sensor-remove": SensorRemove,
}
"""The commands a simulated device knows, by name."""

CommandArgs = ResetArgs | SetInterval | SensorAdd | SensorRemove


def parse_args(name: str, args: dict[str, Any]) -> CommandArgs:
    """The validated arguments of command `name`; CommandError (rejected or error) if not."""
    model = ARGUMENTS.get(name)
    if model is None:
        known = ", ".join(sorted(ARGUMENTS))
        raise CommandError(CommandStatus.REJECTED, f"unknown command {name!r}; known: {known}")
    try:
        parsed = model.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors()[:3])
        raise CommandError(CommandStatus.ERROR, f"bad {name} arguments: {problems}") from exc
    return parsed  # type: ignore[return-value]


def _describe(error: Any) -> str:
    where = ".".join(str(p) for p in error.get("loc", ())) or "args"
    return f"{where}: {error['msg']}"


def open_command(topic: str, payload: bytes) -> Command:
    """The command a message on `.../cmd/<name>` carries, if it may run now.

    CommandError (`command_id` set when the payload has a usable one) for an invalid body,
    a name that differs from the topic's, or a command past `ts + ttl_s`.
    """
    try:
        command = Command.model_validate_json(payload)
    except ValidationError as exc:
        error = CommandError(
            CommandStatus.ERROR, f"not a valid command: {_describe(exc.errors()[0])}"
        )
        error.command_id = _id_of(payload)
        raise error from exc
    name = topic.rsplit("/", 1)[-1]
    problem: CommandError | None = None
    if command.name != name:
        problem = CommandError(
            CommandStatus.ERROR, f"name {command.name!r} differs from topic {name!r}"
        )
    expires = command.expires_at()
    if problem is None and expires is not None and expires.timestamp() < time.time():
        problem = CommandError(CommandStatus.EXPIRED, f"expired at {expires.isoformat()}")
    if problem is not None:
        problem.command_id = str(command.id)
        raise problem
    return command


def _id_of(payload: bytes) -> str | None:
    """The command id of a payload that failed validation, if it has a usable one."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    value = body.get("id") if isinstance(body, dict) else None
    try:
        return str(uuid.UUID(value))
    except (TypeError, ValueError, AttributeError):
        return None


def answer(
    topic: str,
    payload: bytes,
    apply: Callable[[str, dict[str, Any]], str],
    errors: tuple[type[Exception], ...] = (SimulatorError,),
) -> tuple[str | None, str, str]:
    """(command id or None, result status, detail) for one command message: opened, then
    `apply(name, args)`; its CommandError keeps its status, the other `errors` are `error`."""
    try:
        command = open_command(topic, payload)
    except CommandError as exc:
        return exc.command_id, exc.status, exc.detail
    cid = str(command.id)
    try:
        return cid, CommandStatus.OK, apply(command.name, dict(command.args))
    except CommandError as exc:
        return cid, exc.status, exc.detail
    except errors as exc:
        return cid, CommandStatus.ERROR, str(exc)
