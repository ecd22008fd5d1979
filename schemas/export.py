"""JSON Schema files of the messages, for device developers (`fieldline schemas export`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.limits import DEFAULT_LIMITS
from schemas.messages import Command, CommandResult, Event, Status, Telemetry

__all__ = ["DEFAULT_DIR", "SCHEMA_FILES", "check_json_schemas", "export_json_schemas", "render"]

DEFAULT_DIR = Path(__file__).resolve().parent / "json"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_ID_BASE = "urn:fieldline:schemas:"

# file name -> (model, title, description with the topic it travels on)
SCHEMA_FILES: dict[str, tuple[type[BaseModel], str, str]] = {
    "telemetry.schema.json": (
        Telemetry,
        "fieldline telemetry",
        "Published by a device on fl/{tenant}/{device}/telemetry (QoS 1): one sample in "
        "'metrics', or a backlog in 'samples'.",
    ),
    "status.schema.json": (
        Status,
        "fieldline status",
        "Published by a device on fl/{tenant}/{device}/status (QoS 1, retained); the "
        "offline form is the device's Last Will.",
    ),
    "command.schema.json": (
        Command,
        "fieldline command",
        "Sent to a device on fl/{tenant}/{device}/cmd/{name} (QoS 1); 'name' equals the "
        "topic's last level.",
    ),
    "command-result.schema.json": (
        CommandResult,
        "fieldline command result",
        "Published by a device on fl/{tenant}/{device}/cmd-res (QoS 1), answering the command "
        "with the same 'id'.",
    ),
    "event.schema.json": (
        Event,
        "fieldline event",
        "Published by a device on fl/{tenant}/{device}/events (QoS 1): alerts and discrete events.",
    ),
}

_LIMITS_NOTE = (
    f" Payloads are UTF-8 JSON objects of at most {DEFAULT_LIMITS.max_payload_bytes} bytes, "
    f"nested at most {DEFAULT_LIMITS.max_depth} levels; unknown fields are refused."
)


def schema_of(file_name: str) -> dict[str, Any]:
    """The JSON Schema document of one message, as exported to `file_name`."""
    model, title, description = SCHEMA_FILES[file_name]
    schema = model.model_json_schema(mode="validation")
    return {
        "$schema": _DIALECT,
        "$id": _ID_BASE + file_name,
        **schema,
        "title": title,
        "description": description + _LIMITS_NOTE,
    }


def render(file_name: str) -> str:
    """The exact text of an exported schema file: sorted keys, 2-space indent, final newline."""
    return json.dumps(schema_of(file_name), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export_json_schemas(out_dir: Path) -> list[Path]:
    """Write every schema file into `out_dir` (created if needed); return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCHEMA_FILES:
        path = out_dir / name
        text = render(name)
        # Only rewrite changed files, so mtimes and editors stay quiet on a no-op export.
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def check_json_schemas(directory: Path) -> list[str]:
    """Names of the schema files in `directory` that are missing or differ from a fresh export."""
    stale = []
    for name in SCHEMA_FILES:
        path = directory / name
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            stale.append(name)
            continue
        if current != render(name):
            stale.append(name)
    return stale
