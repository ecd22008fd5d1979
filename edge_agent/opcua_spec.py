"""What an `opcua` module's manifest entry and commands may say; pure, no asyncua import.

Nodes are named by NodeId string (`ns=2;s=Machine.Temperature`, `i=2258`) or by a browse
path from the Objects folder (`2:Machine/2:Temperature`). Commands: `write` a value to a
node, `call` a method of an object; a node argument may also be the metric name of a
configured node.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.limits import METRIC_NAME_PATTERN

SECURITY_MODES = ("None", "Sign", "SignAndEncrypt")
SECURITY_POLICY = "Basic256Sha256"
# the NodeId string forms of OPC 10000-6 5.3.1.10, with an optional namespace index or URI
NODE_ID = re.compile(
    r"^(ns=\d{1,5};|nsu=[^;]+;)?(i=\d{1,10}|s=.+|g=[0-9A-Fa-f-]{36}|b=[A-Za-z0-9+/=]+)$"
)
BROWSE_STEP = re.compile(r"^\d{1,5}:[^/]+$")
MAX_NODES = 10_000


class NodeSpec(BaseModel):
    """`nodes = [{ node | path, metric, unit, kind }]`: one OPC UA variable -> one metric."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    node: str | None = Field(default=None, min_length=1)
    path: str | None = Field(default=None, min_length=1)
    metric: str = Field(pattern=f"^{METRIC_NAME_PATTERN}$")
    unit: str | None = Field(default=None, min_length=1, max_length=32)
    kind: Literal["numeric", "bool", "text"] = "numeric"

    @property
    def ref(self) -> str:
        """The node as the manifest names it (NodeId or browse path)."""
        return self.node or self.path or ""


def node_problem(node: NodeSpec) -> str | None:
    """Why a node entry cannot be used, or None."""
    if (node.node is None) == (node.path is None):
        return (
            "give exactly one of node (a NodeId such as 'ns=2;s=Temp') or path ('2:Machine/2:Temp')"
        )
    if node.node is not None and not NODE_ID.match(node.node):
        return (
            f"{node.node!r} is not a NodeId string; use ns=<index>;i=<n> | s=<name> | g=<guid> "
            "| b=<base64>, such as 'ns=2;s=Machine.Temperature'"
        )
    if node.path is not None and not all(BROWSE_STEP.match(s) for s in node.path.split("/")):
        return (
            f"{node.path!r} is not a browse path; use <ns>:<BrowseName> steps joined by '/' from "
            "the Objects folder, such as '2:Machine/2:Temperature'"
        )
    return None


def url_problem(url: str) -> str | None:
    """Why an endpoint URL cannot be used, or None."""
    parts = urlsplit(url)
    if parts.scheme != "opc.tcp":
        return f"{url!r} is not an OPC UA endpoint; use opc.tcp://<host>:<port>[/path]"
    try:
        port = parts.port
    except ValueError:
        return f"{url!r} has an invalid port; use opc.tcp://<host>:<port>[/path]"
    if not parts.hostname:
        return f"{url!r} names no host; use opc.tcp://<host>:<port>[/path]"
    if port is None:
        return f"{url!r} names no port; OPC UA's default is 4840: opc.tcp://{parts.hostname}:4840"
    return None


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class WriteArgs(_Args):
    """`write`: `{"node": NodeId | browse path | metric, "value": ...}`."""

    node: str = Field(min_length=1)
    value: bool | int | float | str


class CallArgs(_Args):
    """`call`: `{"object": node, "method": node | browse name, "args": [...]}`."""

    object: str = Field(min_length=1)
    method: str = Field(min_length=1)
    args: list[bool | int | float | str] = Field(default_factory=list, max_length=32)


COMMANDS: dict[str, type[_Args]] = {"write": WriteArgs, "call": CallArgs}


def parse_command(name: str, args: dict[str, Any]) -> WriteArgs | CallArgs:
    """The validated arguments of an OPC UA command; ValueError with one line if not."""
    model = COMMANDS.get(name)
    if model is None:
        raise ValueError(f"an opcua module takes 'write' or 'call', not {name!r}")
    try:
        parsed = model.model_validate(args)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "args"
        raise ValueError(f"bad {name} arguments: {where}: {err['msg']}") from None
    assert isinstance(parsed, WriteArgs | CallArgs)
    return parsed
