"""The interface of a field module: an async source on a real bus (OPC UA, Modbus).

Simulated modules are sync objects the agent polls; a field module runs its own tasks
(subscriptions, polling, reconnects) and pushes to the agent through two callbacks it is
given at `start`:

- `emit({"ts": epoch ms, "metrics": {name: value | {"v", "u"}}})`: a reading, routed as a
  simulated module's (`<module>.<metric>` upstream, rules by its own metric names);
- `event(severity, kind, message, data)`: something the cloud should see on the agent's
  `events` topic (a Bad status, a lost connection and the gap it left, an unknown node).

Commands (`command(name, args)`) are coroutines: the agent runs them as tasks and puts
their result on `cmd-res` when they finish, so a slow machine never blocks the agent. A
command that cannot run raises FieldError, whose `status` is the result's status
(`rejected` for an unknown command or bad arguments, `error` when the machine refused).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from edge_agent.errors import EdgeError

REJECTED = "rejected"
ERROR = "error"

Emit = Callable[[dict[str, Any]], None]
"""Hands the agent one reading `{"ts", "metrics"}`; never blocks, never raises."""

EmitEvent = Callable[[str, str, str, dict[str, Any]], None]
"""Hands the agent one event: (severity, kind, message, data); `severity` is a
schemas.messages.Severity value, `kind` an id-like word such as `opcua_bad_status`."""


class FieldError(EdgeError):
    """A field command that could not run; `status` is its cmd-res status, the message one line."""

    def __init__(self, detail: str, status: str = ERROR) -> None:
        self.status = status
        self.detail = detail
        super().__init__(detail)


@runtime_checkable
class FieldModule(Protocol):
    """An async module on a field bus; the agent owns its lifecycle."""

    name: str
    kind: str

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The collecting task while started (the agent watches it end), else None."""
        ...

    async def start(self, emit: Emit, event: EmitEvent) -> None:
        """Begin collecting in background tasks; return at once (a server that is down is
        retried with backoff, reported through `event`, never raised)."""
        ...

    async def stop(self) -> None:
        """Cancel the tasks and close the connection; safe to call twice."""
        ...

    def check_command(self, name: str, args: dict[str, Any]) -> None:
        """Validate a command before it is accepted; FieldError (`rejected`) if it cannot be."""
        ...

    async def command(self, name: str, args: dict[str, Any]) -> str:
        """Carry out a command on the machine: the detail of an `ok` result, else FieldError."""
        ...
