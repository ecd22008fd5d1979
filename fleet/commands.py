"""Commands to devices: recorded before they are sent, answered by the ingest worker."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from fleet.db import Db, check_id, schema, tenant_tables
from fleet.devices import DeviceState, device_state
from fleet.errors import NotFoundError
from fleet.events import decode_json
from schemas.messages import Command

_COLUMNS = "id, device_id AS device, name, args, status, result, issued_at, updated_at"


async def record_command(db: Db, tenant: str, device: str, command: Command) -> DeviceState:
    """The command as sent (status `sent`), and the device's presence; the ingest worker adds
    the device's answer. NotFoundError, and nothing recorded, for an unknown device."""
    # a device never heard of has no session at the broker: the command would be dropped
    state = await device_state(db, tenant, device)
    s = schema(tenant)
    async with tenant_tables(tenant):
        await db.execute(
            f"INSERT INTO {s}.commands (id, device_id, name, args, issued_at, status) "  # noqa: S608
            "VALUES ($1, $2, $3, $4::jsonb, $5, 'sent') ON CONFLICT (id) DO NOTHING",
            command.id, device, command.name, json.dumps(command.args), command.ts,
        )  # fmt: skip
    return state


def _row(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["id"] = str(out["id"])
    out["args"] = decode_json(out["args"])
    out["result"] = decode_json(out["result"])
    return out


async def command_row(db: Db, tenant: str, command_id: str) -> dict[str, Any] | None:
    """The command of an id in this tenant (status and result), or None."""
    try:
        key = uuid.UUID(command_id)
    except ValueError:
        return None
    s = schema(tenant)
    async with tenant_tables(tenant):
        row = await db.fetchrow(
            f"SELECT {_COLUMNS} FROM {s}.commands WHERE id = $1",  # noqa: S608
            key,
        )
    return _row(row) if row else None


async def get_command(db: Db, tenant: str, command_id: str) -> dict[str, Any]:
    """command_row, or NotFoundError."""
    row = await command_row(db, tenant, command_id)
    if row is None:
        raise NotFoundError(f"no command {command_id} in tenant {tenant}")
    return row


async def list_commands(
    db: Db, tenant: str, limit: int, *, device: str | None = None
) -> list[dict[str, Any]]:
    """The newest commands of one device (or the tenant), newest first."""
    if device is not None:
        check_id(device, "device id")
    s = schema(tenant)
    async with tenant_tables(tenant):
        rows = await db.fetch(
            f"SELECT {_COLUMNS} FROM {s}.commands "  # noqa: S608
            "WHERE ($1::text IS NULL OR device_id = $1) ORDER BY issued_at DESC LIMIT $2",
            device, limit,
        )  # fmt: skip
    return [_row(r) for r in rows]


async def commands_updated(
    db: Db, tenant: str, after: datetime, *, device: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Commands whose row changed after `after`, oldest change first (the live stream)."""
    s = schema(tenant)
    async with tenant_tables(tenant):
        rows = await db.fetch(
            f"SELECT {_COLUMNS} FROM {s}.commands "  # noqa: S608
            "WHERE updated_at > $1 AND ($2::text IS NULL OR device_id = $2) "
            "ORDER BY updated_at LIMIT $3",
            after, device, limit,
        )  # fmt: skip
    return [_row(r) for r in rows]


async def mark_unsent(db: Db, tenant: str, command_id: str, why: str) -> None:
    """A recorded command the broker never took: status error, with why."""
    s = schema(tenant)
    async with tenant_tables(tenant):
        await db.execute(
            f"UPDATE {s}.commands SET status = 'error', result = $2::jsonb, "  # noqa: S608
            "updated_at = now() WHERE id = $1 AND status = 'sent'",
            uuid.UUID(command_id), json.dumps({"status": "error", "detail": f"not sent: {why}"}),
        )  # fmt: skip
