"""Devices and their metrics: presence, firmware, metric names, units and kinds."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleet.db import Db, check_id, schema, tenant_tables
from fleet.errors import BadInputError, NotFoundError


@dataclass(frozen=True)
class DeviceState:
    """What the database knows of a device's presence."""

    id: str
    status: str  # online, offline or unknown
    last_seen: datetime | None

    @property
    def online(self) -> bool:
        return self.status == "online"


@dataclass(frozen=True)
class MetricInfo:
    """A metric of a device: its id in the tenant's schema, name, unit and storage kind."""

    id: int
    name: str
    unit: str | None
    display_name: str | None
    kind: str  # numeric, bool or text

    def public(self) -> dict[str, Any]:
        """As the API shows it (without the internal id)."""
        return {"name": self.name, "unit": self.unit, "display_name": self.display_name,
                "kind": self.kind}  # fmt: skip


async def list_devices(db: Db, tenant: str, search: str | None = None) -> list[dict[str, Any]]:
    """Every device of a tenant (whose id contains `search`): status, last seen, first seen,
    firmware, boot and its metric names."""
    s = schema(tenant)
    if search and ("\x00" in search or not search.isprintable()):
        # PostgreSQL text cannot hold NUL: a 400 here rather than a database error
        raise BadInputError("search: give printable text, part of a device id")
    pattern = None if not search else "%" + _like_escape(search) + "%"
    async with tenant_tables(tenant):
        rows = await db.fetch(
            f"SELECT d.id, d.status, d.last_seen, d.first_seen, d.fw, d.boot, "  # noqa: S608
            f"coalesce(array_agg(m.name ORDER BY m.name) FILTER (WHERE m.name IS NOT NULL), "
            f"'{{}}') AS metrics FROM {s}.devices d LEFT JOIN {s}.metrics m "
            "ON m.device_id = d.id WHERE ($1::text IS NULL OR d.id LIKE $1) "
            "GROUP BY d.id ORDER BY d.id",
            pattern,
        )
    return [dict(r) for r in rows]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def get_device(db: Db, tenant: str, device: str) -> dict[str, Any]:
    """One device as list_devices shows it; NotFoundError if the tenant has no such device."""
    check_id(device, "device id")
    s = schema(tenant)
    async with tenant_tables(tenant):
        row = await db.fetchrow(
            f"SELECT d.id, d.status, d.last_seen, d.first_seen, d.fw, d.boot, "  # noqa: S608
            f"coalesce(array_agg(m.name ORDER BY m.name) FILTER (WHERE m.name IS NOT NULL), "
            f"'{{}}') AS metrics FROM {s}.devices d LEFT JOIN {s}.metrics m "
            "ON m.device_id = d.id WHERE d.id = $1 GROUP BY d.id",
            device,
        )
    if row is None:
        raise _no_device(tenant, device)
    return dict(row)


def _no_device(tenant: str, device: str) -> NotFoundError:
    return NotFoundError(
        f"no such device {device} in tenant {tenant} (`fieldline devices list {tenant}` "
        "lists the devices it has heard from)"
    )


async def device_state(db: Db, tenant: str, device: str) -> DeviceState:
    """The device's presence; NotFoundError for a device the workers never heard from."""
    check_id(device, "device id")
    s = schema(tenant)
    async with tenant_tables(tenant):
        row = await db.fetchrow(
            f"SELECT id, status, last_seen FROM {s}.devices WHERE id = $1",  # noqa: S608
            device,
        )
    if row is None:
        raise _no_device(tenant, device)
    return DeviceState(row["id"], row["status"], row["last_seen"])


async def presence(db: Db, tenant: str) -> list[DeviceState]:
    """Every device's presence (the live stream compares these)."""
    s = schema(tenant)
    async with tenant_tables(tenant):
        rows = await db.fetch(
            f"SELECT id, status, last_seen FROM {s}.devices ORDER BY id"  # noqa: S608
        )
    return [DeviceState(r["id"], r["status"], r["last_seen"]) for r in rows]


async def metric_infos(db: Db, tenant: str, device: str) -> list[MetricInfo]:
    """The device's metrics, by name; NotFoundError for an unknown device."""
    await device_state(db, tenant, device)
    s = schema(tenant)
    async with tenant_tables(tenant):
        rows = await db.fetch(
            f"SELECT id, name, unit, display_name, kind FROM {s}.metrics "  # noqa: S608
            "WHERE device_id = $1 ORDER BY name",
            device,
        )
    return [MetricInfo(r["id"], r["name"], r["unit"], r["display_name"], r["kind"]) for r in rows]


async def numeric_metric(db: Db, tenant: str, device: str, metric: str) -> MetricInfo:
    """A metric whose values are numbers (numeric or bool): NotFoundError naming the metrics
    the device has, BadInputError for a text metric."""
    infos = await metric_infos(db, tenant, device)
    for info in infos:
        if info.name == metric:
            if info.kind == "text":
                raise BadInputError(
                    f"{tenant}/{device} metric {metric!r} holds text, not numbers: it has no "
                    "series to chart (its values are in text_values)"
                )
            return info
    names = ", ".join(i.name for i in infos) or "none"
    raise NotFoundError(f"{tenant}/{device} has no metric {metric!r} (it has: {names})")
