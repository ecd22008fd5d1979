"""What the everyday commands read and write: devices, time-bucketed values, issued commands."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from core.errors import FieldlineError
from ingest_worker.database import connect
from ingest_worker.migrate import quote_ident, tenant_schema
from schemas.messages import Command
from schemas.topics import validate_id

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """`30s`, `15m`, `1h`, `7d` as a timedelta; FieldlineError for anything else."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise FieldlineError(f"{text!r} is not a duration: use a number and s, m, h or d (15m)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _schema(tenant: str) -> str:
    return quote_ident(tenant_schema(validate_id(tenant, "tenant id")))


async def _with(dsn: str, tenant: str, work: Any) -> Any:
    conn = await connect(dsn, timeout=10)
    try:
        return await work(conn, _schema(tenant))
    except asyncpg.UndefinedTableError as exc:
        raise FieldlineError(
            f"tenant {tenant!r} has no data yet (no schema): check the name, or that an ingest "
            "worker has received something from it"
        ) from exc
    finally:
        await conn.close()


async def list_devices(dsn: str, tenant: str) -> list[dict[str, Any]]:
    """Every device of a tenant: status, last seen, firmware, boot and its metric names."""

    async def work(conn: asyncpg.Connection, schema: str) -> list[dict[str, Any]]:
        rows = await conn.fetch(
            f"SELECT d.id, d.status, d.last_seen, d.first_seen, d.fw, d.boot, "  # noqa: S608
            f"coalesce(array_agg(m.name ORDER BY m.name) FILTER (WHERE m.name IS NOT NULL), "
            f"'{{}}') AS metrics FROM {schema}.devices d LEFT JOIN {schema}.metrics m "
            "ON m.device_id = d.id GROUP BY d.id ORDER BY d.id"
        )
        return [dict(r) for r in rows]

    result: list[dict[str, Any]] = await _with(dsn, tenant, work)
    return result


@dataclass(frozen=True)
class DeviceState:
    """What the database knows of a device's presence."""

    id: str
    status: str  # online, offline or unknown
    last_seen: datetime | None

    @property
    def online(self) -> bool:
        return self.status == "online"


async def _device(conn: asyncpg.Connection, schema: str, tenant: str, device: str) -> DeviceState:
    """The device's row, or FieldlineError: a device the workers never heard from is unknown."""
    validate_id(device, "device id")
    row = await conn.fetchrow(
        f"SELECT id, status, last_seen FROM {schema}.devices WHERE id = $1",  # noqa: S608
        device,
    )
    if row is None:
        raise FieldlineError(
            f"no such device {device} in tenant {tenant} (`fieldline devices list {tenant}` "
            "lists the devices it has heard from)"
        )
    return DeviceState(row["id"], row["status"], row["last_seen"])


@dataclass(frozen=True)
class Bucket:
    """One time bucket of a metric."""

    start: datetime
    avg: float
    min: float
    max: float
    count: int


async def query(
    dsn: str, tenant: str, device: str, metric: str, since: timedelta, bucket: timedelta
) -> list[Bucket]:
    """time_bucket aggregates of one numeric metric over the last `since`."""

    async def work(conn: asyncpg.Connection, schema: str) -> list[Bucket]:
        metric_id = await conn.fetchval(
            f"SELECT id FROM {schema}.metrics WHERE device_id = $1 AND name = $2",  # noqa: S608
            device, metric,
        )  # fmt: skip
        if metric_id is None:
            await _device(conn, schema, tenant, device)  # an unknown device is named as such
            known = await conn.fetch(
                f"SELECT name FROM {schema}.metrics WHERE device_id = $1 ORDER BY name",  # noqa: S608
                device,
            )
            names = ", ".join(r["name"] for r in known) or "none"
            raise FieldlineError(f"{tenant}/{device} has no metric {metric!r} (it has: {names})")
        rows = await conn.fetch(
            f"SELECT time_bucket($1::interval, time) AS start, avg(value) AS avg, "  # noqa: S608
            f"min(value) AS min, max(value) AS max, count(*) AS count "
            f"FROM {schema}.numeric_values WHERE metric_id = $2 AND time > now() - $3::interval "
            "GROUP BY start ORDER BY start",
            bucket, metric_id, since,
        )  # fmt: skip
        return [Bucket(r["start"], r["avg"], r["min"], r["max"], r["count"]) for r in rows]

    result: list[Bucket] = await _with(dsn, tenant, work)
    return result


async def record_command(dsn: str, tenant: str, device: str, command: Command) -> DeviceState:
    """The command as sent (status `sent`), and the device's presence; the ingest worker adds
    the device's answer. FieldlineError, and nothing recorded, for an unknown device."""

    async def work(conn: asyncpg.Connection, schema: str) -> DeviceState:
        # a device never heard of has no session at the broker: the command would be dropped
        state = await _device(conn, schema, tenant, device)
        await conn.execute(
            f"INSERT INTO {schema}.commands (id, device_id, name, args, issued_at, status) "  # noqa: S608
            "VALUES ($1, $2, $3, $4::jsonb, $5, 'sent') ON CONFLICT (id) DO NOTHING",
            command.id, device, command.name, json.dumps(command.args), command.ts,
        )  # fmt: skip
        return state

    result: DeviceState = await _with(dsn, tenant, work)
    return result


async def command_row(dsn: str, tenant: str, command_id: str) -> dict[str, Any] | None:
    """The commands row of an id (status and result), or None."""

    async def work(conn: asyncpg.Connection, schema: str) -> dict[str, Any] | None:
        row = await conn.fetchrow(
            f"SELECT id, device_id, name, status, result FROM {schema}.commands "  # noqa: S608
            "WHERE id = $1::uuid",
            command_id,
        )
        return dict(row) if row else None

    result: dict[str, Any] | None = await _with(dsn, tenant, work)
    return result
