"""The arguments of the commands every device takes: `reset` and `set-interval`.

A device kind with more commands (the simulator's `sensor-add`) passes its own table to
`parse_args`. A body that does not validate becomes an `error` result naming the field; an
unknown command is `rejected`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_runtime.errors import CommandError
from schemas.messages import CommandStatus

MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 86_400.0


class Args(BaseModel):
    """Base of command arguments: unknown keys are an error, JSON numbers may be ints."""

    model_config = ConfigDict(extra="forbid", strict=False)


class ResetArgs(Args):
    """`reset`: no arguments."""


class SetInterval(Args):
    """`set-interval`: the seconds between telemetry messages."""

    interval_s: float = Field(ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S, allow_inf_nan=False)


ARGUMENTS: Mapping[str, type[Args]] = {"reset": ResetArgs, "set-interval": SetInterval}
"""The commands every device knows, by name."""


def parse_args(
    name: str, args: dict[str, Any], known: Mapping[str, type[Args]] = ARGUMENTS
) -> Args:
    """The validated arguments of command `name` among `known`; CommandError if not."""
    model = known.get(name)
    if model is None:
        names = ", ".join(sorted(known))
        raise CommandError(CommandStatus.REJECTED, f"unknown command {name!r}; known: {names}")
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(describe(e) for e in exc.errors()[:3])
        raise CommandError(CommandStatus.ERROR, f"bad {name} arguments: {problems}") from exc


def describe(error: Any) -> str:
    """One pydantic error as `where: what`, for command results."""
    where = ".".join(str(p) for p in error.get("loc", ())) or "args"
    return f"{where}: {error['msg']}"
