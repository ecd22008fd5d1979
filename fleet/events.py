"""Events of devices, and alerts: the events of severity warning and above."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fleet.db import Db, check_id, schema, tenant_tables

ALERT_SEVERITIES = ("warning", "error", "critical")


async def events(
    db: Db,
    tenant: str,
    since: datetime,
    limit: int,
    *,
    device: str | None = None,
    alerts_only: bool = False,
) -> list[dict[str, Any]]:
    """Events since `since`, newest first, of one device or all; alerts_only keeps warning,
    error and critical (the edge rules' alerts and the devices' own)."""
    if device is not None:
        check_id(device, "device id")
    severities = list(ALERT_SEVERITIES) if alerts_only else None
    s = schema(tenant)
    async with tenant_tables(tenant):
        rows = await db.fetch(
            f"SELECT time, device_id AS device, kind, severity, body FROM {s}.events "  # noqa: S608
            "WHERE time >= $1 AND ($2::text IS NULL OR device_id = $2) "
            "AND ($3::text[] IS NULL OR severity = ANY($3::text[])) "
            "ORDER BY time DESC LIMIT $4",
            since, device, severities, limit,
        )  # fmt: skip
    return [{**dict(r), "body": decode_json(r["body"])} for r in rows]


def decode_json(value: Any) -> Any:
    """A jsonb column as asyncpg returns it (text) decoded; None stays None."""
    return json.loads(value) if isinstance(value, str) else value
